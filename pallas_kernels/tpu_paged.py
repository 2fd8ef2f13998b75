"""Paged attention kernels for Pallas TPU: decode (one query per sequence) and chunked prefill.

Pages are fetched by BlockSpecs whose index maps read the page table from scalar-prefetched SMEM.
A grid step processes `pages_per_block` pages: the page pool is passed that many times, each copy
with an index map picking one page of the step, so the pipeline issues all of a step's page DMAs
together and double-buffers them against the previous step's compute. Pages past a sequence's end
are clamped to its last page (the pipeline skips re-fetching an unchanged block) and masked.

Decode splits long contexts into `num_splits` partitions (flash-decoding): each writes an
unnormalised partial (max, denominator, accumulator), and `combine_splits` merges them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _softmax


def _page_specs(pages, page_size, head_dim, pages_per_block, max_pages, logical_page):
  """`pages` BlockSpecs, one per page slot of a step; `logical_page(grid..., refs..., slot)` gives
  the (already clamped) index into the sequence's page-table row."""

  def spec(slot):
    def index_map(b, h, i, j, *refs):
      table_ref = refs[-1]
      logical = logical_page(b, i, j, slot, *refs)
      return h, table_ref[b * max_pages + logical], 0, 0
    return pl.BlockSpec((None, None, page_size, head_dim), index_map)

  del pages
  return [spec(slot) for slot in range(pages_per_block)]


# ------------------------------------------------------------------------------ decode

def _decode_kernel(lengths_ref, table_ref, q_ref, *refs, scale, page_size, pages_per_block,
                   steps_per_split):
  del table_ref
  k_refs = refs[:pages_per_block]
  v_refs = refs[pages_per_block:2 * pages_per_block]
  acc_out, m_out, l_out, m_ref, l_ref, acc_ref = refs[2 * pages_per_block:]
  b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  first_page = (split * steps_per_split + j) * pages_per_block

  @pl.when(j == 0)
  def _init():
    _softmax.init_scratch(m_ref, l_ref, acc_ref)

  @pl.when(first_page * page_size < length)
  def _accumulate():
    q = q_ref[...]  # [G, D]
    m, l, acc = m_ref[...], l_ref[...], acc_ref[...]
    for slot in range(pages_per_block):
      scores = _softmax.dot_nt(q, k_refs[slot][...]) * scale  # [G, page_size]
      k_pos = ((first_page + slot) * page_size
               + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1))
      m, l, acc = _softmax.update(scores, k_pos < length, v_refs[slot][...], m, l, acc)
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    acc_out[...], m_out[...], l_out[...] = acc_ref[...], m_ref[...], l_ref[...]


def combine_splits(acc, m, l, *, exp=jnp.exp):
  """Partials acc [..., S, G, D], m/l [..., S, G, 1] over S splits -> float32 [..., G, D]
  (`exp` is jnp.exp2 where the kernel kept m in log2 units)."""
  m_max = jnp.max(m, axis=-3, keepdims=True)
  weight = exp(m - m_max)  # splits that saw no key have l == 0 and contribute nothing
  l_total = jnp.sum(weight * l, axis=-3)
  return _softmax.finish(l_total, jnp.sum(weight * acc, axis=-3))


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, *, sm_scale=None,
                           pages_per_block, num_splits, interpret=False):
  """q: [B, Hq, D]; k/v pages: [Hkv, P, page_size, D]; lengths int32[B];
  page_table int32[B, max_pages] -> [B, Hq, D]."""
  b, hq, d = q.shape
  hkv, _, page_size, _ = k_pages.shape
  group = hq // hkv
  max_pages = page_table.shape[1]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  steps = -(-max_pages // pages_per_block)
  steps_per_split = -(-steps // num_splits)

  def logical_page(bi, split, j, slot, lengths_ref, table_ref):
    del table_ref
    last = jnp.maximum(pl.cdiv(lengths_ref[bi], page_size) - 1, 0)
    wanted = (split * steps_per_split + j) * pages_per_block + slot
    return jnp.minimum(jnp.minimum(wanted, last), max_pages - 1)

  page_specs = _page_specs(k_pages, page_size, d, pages_per_block, max_pages, logical_page)
  q_spec = pl.BlockSpec((None, None, group, d), lambda bi, h, s, j, *_: (bi, h, 0, 0))
  part_spec = lambda last: pl.BlockSpec((None, None, None, group, last),
                                        lambda bi, h, s, j, *_: (bi, h, s, 0, 0))
  kernel = functools.partial(_decode_kernel, scale=scale, page_size=page_size,
                             pages_per_block=pages_per_block, steps_per_split=steps_per_split)
  acc, m, l = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, hkv, num_splits, steps_per_split),
          in_specs=[q_spec] + page_specs + page_specs,
          out_specs=[part_spec(d), part_spec(1), part_spec(1)],
          scratch_shapes=[pltpu.VMEM((group, 1), jnp.float32),
                          pltpu.VMEM((group, 1), jnp.float32),
                          pltpu.VMEM((group, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, group, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, group, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, group, 1), jnp.float32)],
      interpret=pltpu.InterpretParams() if interpret else False,
  )(lengths.astype(jnp.int32), page_table.reshape(-1).astype(jnp.int32),
    q.reshape(b, hkv, group, d), *([k_pages] * pages_per_block), *([v_pages] * pages_per_block))
  return combine_splits(acc, m, l).reshape(b, hq, d).astype(q.dtype)


# ------------------------------------------------------------------------------ chunked prefill

def _chunk_kernel(context_ref, chunk_ref, table_ref, q_ref, *refs, scale, page_size,
                  pages_per_block, block_q, group):
  del table_ref
  k_refs = refs[:pages_per_block]
  v_refs = refs[pages_per_block:2 * pages_per_block]
  o_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block:]
  b, q_block, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  context, chunk = context_ref[b], chunk_ref[b]
  rows = block_q * group
  first_page = j * pages_per_block
  q_idx = q_block * block_q + jax.lax.div(
      jax.lax.broadcasted_iota(jnp.int32, (rows, page_size), 0), group)
  q_pos = context + q_idx
  # The block's last real query sits at this position; pages after it are not needed.
  last_pos = context + jnp.minimum(chunk, (q_block + 1) * block_q) - 1

  @pl.when(j == 0)
  def _init():
    _softmax.init_scratch(m_ref, l_ref, acc_ref)

  @pl.when((q_block * block_q < chunk) & (first_page * page_size <= last_pos))
  def _accumulate():
    q = q_ref[...]  # [rows, D]
    m, l, acc = m_ref[...], l_ref[...], acc_ref[...]
    for slot in range(pages_per_block):
      scores = _softmax.dot_nt(q, k_refs[slot][...]) * scale  # [rows, page_size]
      k_pos = ((first_page + slot) * page_size
               + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1))
      mask = (k_pos <= q_pos) & (q_idx < chunk)
      m, l, acc = _softmax.update(scores, mask, v_refs[slot][...], m, l, acc)
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

  @pl.when(j == pl.num_programs(3) - 1)
  def _store():
    out = _softmax.finish(l_ref[...], acc_ref[...])
    q_rows = q_block * block_q + jax.lax.div(
        jax.lax.broadcasted_iota(jnp.int32, out.shape, 0), group)
    o_ref[...] = jnp.where(q_rows < chunk, out, 0.0).astype(o_ref.dtype)


def chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens, page_table, *,
                              sm_scale=None, block_q, pages_per_block, interpret=False):
  """q: [B, C, Hq, D] at positions context_lens + [0, C); pages already hold the chunk's K/V.
  chunk_lens int32[B] <= C real queries per row -> [B, C, Hq, D] (zeros past chunk_lens)."""
  b, c, hq, d = q.shape
  hkv, _, page_size, _ = k_pages.shape
  group = hq // hkv
  max_pages = page_table.shape[1]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q = _softmax.pad_axis(q, 1, block_q)
  padded = q.shape[1]
  q_rows = _softmax.group_rows(q, hkv)
  rows = block_q * group
  steps = -(-max_pages // pages_per_block)

  def logical_page(bi, q_block, j, slot, context_ref, chunk_ref, table_ref):
    del table_ref
    real = jnp.minimum(chunk_ref[bi], (q_block + 1) * block_q)
    last = jnp.maximum(context_ref[bi] + real - 1, 0) // page_size
    return jnp.minimum(jnp.minimum(j * pages_per_block + slot, last), max_pages - 1)

  page_specs = _page_specs(k_pages, page_size, d, pages_per_block, max_pages, logical_page)
  q_spec = pl.BlockSpec((None, None, rows, d), lambda bi, h, i, j, *_: (bi, h, i, 0))
  kernel = functools.partial(_chunk_kernel, scale=scale, page_size=page_size,
                             pages_per_block=pages_per_block, block_q=block_q, group=group)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(b, hkv, padded // block_q, steps),
          in_specs=[q_spec] + page_specs + page_specs,
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                          pltpu.VMEM((rows, 1), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(context_lens.astype(jnp.int32), chunk_lens.astype(jnp.int32),
    page_table.reshape(-1).astype(jnp.int32), q_rows,
    *([k_pages] * pages_per_block), *([v_pages] * pages_per_block))
  return _softmax.ungroup_rows(out, c, hq)
