"""The attention kernels for NVIDIA GPUs, on Pallas's Triton backend.

Why Triton and not Mosaic GPU: on the H200 anchors (../shared/anchors), JAX's own Pallas attention
reached 316 TFLOP/s on Triton against 156 TFLOP/s (causal) on Mosaic GPU, and Triton's paged decode
1.68 TB/s; Mosaic GPU kernels need hand-written warpgroup pipelines to pass that. Revisit when
Triton is removed from Pallas.

Each program owns one (batch row, kv head) and the G = Hq/Hkv query heads that share it, so K/V are
read once per group. Loops over key blocks / page blocks run inside the program (Triton has no
scalar prefetch; the page table is read from a ref). Tensor-core dots need at least 16 rows, so
decode pads the query group to 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels import _softmax
from pallas_kernels.tpu_paged import combine_splits

MIN_DOT_ROWS = 16


def _compiler_params(num_warps, num_stages):
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------ prefill

def _prefill_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, causal, scale, block_q, block_k,
                    group):
  b, q_block = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[b]
  rows = block_q * group
  q_start = q_block * block_q
  q = q_ref[...]
  q_pos = q_start + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), group)
  last_key = jnp.maximum(length - 1, 0)
  if causal:
    last_key = jnp.minimum(last_key, q_start + block_q - 1)
  num_blocks = jnp.where(q_start < length, last_key // block_k + 1, 0)

  def body(kb, carry):
    k_start = kb * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    scores = _softmax.dot_nt(q, k) * scale
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    mask = k_pos < length
    if causal:
      mask = mask & (k_pos <= q_pos)
    return _softmax.update(scores, mask, v, *carry)

  init = (jnp.full((rows, 1), _softmax.MASK_VALUE, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32), jnp.zeros((rows, q.shape[-1]), jnp.float32))
  _, l, acc = jax.lax.fori_loop(0, num_blocks, body, init)
  out = _softmax.finish(l, acc)
  out_pos = q_start + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, out.shape, 0), group)
  o_ref[...] = jnp.where(out_pos < length, out, 0.0).astype(o_ref.dtype)


def prefill_attention(q, k, v, lengths, *, causal=True, sm_scale=None, block_q, block_k,
                      num_warps=4, num_stages=2, interpret=False):
  """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; lengths int32[B] -> [B, S, Hq, D]."""
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q, k, v = (_softmax.pad_axis(x, 1, max(block_q, block_k)) for x in (q, k, v))
  padded = q.shape[1]
  rows = block_q * group
  kernel = functools.partial(_prefill_kernel, causal=causal, scale=scale, block_q=block_q,
                             block_k=block_k, group=group)
  out = pl.pallas_call(
      kernel,
      grid=(b, hkv, padded // block_q),
      in_specs=[pl.BlockSpec((b,), lambda bi, h, i: (0,)),
                pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, i, 0)),
                pl.BlockSpec((None, None, padded, d), lambda bi, h, i: (bi, h, 0, 0)),
                pl.BlockSpec((None, None, padded, d), lambda bi, h, i: (bi, h, 0, 0))],
      out_specs=pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, padded * group, d), q.dtype),
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
  )(lengths.astype(jnp.int32), _softmax.group_rows(q, hkv), k.transpose(0, 2, 1, 3),
    v.transpose(0, 2, 1, 3))
  return _softmax.ungroup_rows(out, s, hq)


# ------------------------------------------------------------------------------ paged

def _paged_loop(q, k_pages_ref, v_pages_ref, table_ref, first_page, num_blocks, mask_fn, *,
                page_size, pages_per_block):
  """Online softmax over `num_blocks` blocks of `pages_per_block` pages from `first_page` on."""
  rows, d = q.shape
  block_k = pages_per_block * page_size

  def body(i, carry):
    start = first_page + i * pages_per_block
    page_ids = table_ref[pl.ds(start, pages_per_block)]
    k = k_pages_ref[page_ids].reshape(block_k, d)
    v = v_pages_ref[page_ids].reshape(block_k, d)
    scores = _softmax.dot_nt(q, k)
    k_pos = start * page_size + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    return _softmax.update(scores, mask_fn(k_pos), v, *carry)

  init = (jnp.full((rows, 1), _softmax.MASK_VALUE, jnp.float32),
          jnp.zeros((rows, 1), jnp.float32), jnp.zeros((rows, d), jnp.float32))
  return jax.lax.fori_loop(0, num_blocks, body, init)


def _decode_kernel(lengths_ref, table_ref, q_ref, k_pages_ref, v_pages_ref, acc_ref, m_ref,
                   l_ref, *, scale, page_size, pages_per_block, blocks_per_split):
  b, split = pl.program_id(0), pl.program_id(2)
  length = lengths_ref[b]
  first_page = split * blocks_per_split * pages_per_block
  pages_left = pl.cdiv(length, page_size) - first_page
  num_blocks = jnp.clip(pl.cdiv(pages_left, pages_per_block), 0, blocks_per_split)
  q = (q_ref[...].astype(jnp.float32) * scale).astype(q_ref.dtype)
  m, l, acc = _paged_loop(q, k_pages_ref, v_pages_ref, table_ref, first_page, num_blocks,
                          lambda k_pos: k_pos < length, page_size=page_size,
                          pages_per_block=pages_per_block)
  acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, *, sm_scale=None,
                           pages_per_block, num_splits, num_warps=4, num_stages=2,
                           interpret=False):
  """q: [B, Hq, D]; k/v pages: [Hkv, P, page_size, D]; lengths int32[B];
  page_table int32[B, max_pages] -> [B, Hq, D]."""
  b, hq, d = q.shape
  hkv, num_pages, page_size, _ = k_pages.shape
  group = hq // hkv
  rows = max(group, MIN_DOT_ROWS)
  scale = d ** -0.5 if sm_scale is None else sm_scale
  max_pages = page_table.shape[1]
  blocks = -(-max_pages // pages_per_block)
  blocks_per_split = -(-blocks // num_splits)
  # The page table is padded so every block reads pages_per_block valid ids (masked past length).
  padded_pages = num_splits * blocks_per_split * pages_per_block
  table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, padded_pages - max_pages)))
  q_rows = jnp.pad(q.reshape(b, hkv, group, d), ((0, 0), (0, 0), (0, rows - group), (0, 0)))
  part = lambda last: pl.BlockSpec((None, None, None, rows, last),
                                   lambda bi, h, s: (bi, h, s, 0, 0))
  kernel = functools.partial(_decode_kernel, scale=scale, page_size=page_size,
                             pages_per_block=pages_per_block, blocks_per_split=blocks_per_split)
  acc, m, l = pl.pallas_call(
      kernel,
      grid=(b, hkv, num_splits),
      in_specs=[pl.BlockSpec((b,), lambda bi, h, s: (0,)),
                pl.BlockSpec((None, padded_pages), lambda bi, h, s: (bi, 0)),
                pl.BlockSpec((None, None, rows, d), lambda bi, h, s: (bi, h, 0, 0)),
                pl.BlockSpec((None, num_pages, page_size, d), lambda bi, h, s: (h, 0, 0, 0)),
                pl.BlockSpec((None, num_pages, page_size, d), lambda bi, h, s: (h, 0, 0, 0))],
      out_specs=[part(d), part(1), part(1)],
      out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, rows, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, rows, 1), jnp.float32),
                 jax.ShapeDtypeStruct((b, hkv, num_splits, rows, 1), jnp.float32)],
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
  )(lengths.astype(jnp.int32), table, q_rows, k_pages, v_pages)
  out = combine_splits(acc, m, l)[:, :, :group]
  return out.reshape(b, hq, d).astype(q.dtype)


def _chunk_kernel(context_ref, chunk_ref, table_ref, q_ref, k_pages_ref, v_pages_ref, o_ref, *,
                  scale, page_size, pages_per_block, block_q, group):
  b, q_block = pl.program_id(0), pl.program_id(2)
  context, chunk = context_ref[b], chunk_ref[b]
  rows = block_q * group
  block_k = pages_per_block * page_size
  q_idx = q_block * block_q + jax.lax.div(
      jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), group)
  real = jnp.minimum(chunk, (q_block + 1) * block_q) - q_block * block_q
  last_pos = context + q_block * block_q + real - 1
  num_blocks = jnp.where(real > 0, last_pos // block_k + 1, 0)
  q = (q_ref[...].astype(jnp.float32) * scale).astype(q_ref.dtype)
  _, l, acc = _paged_loop(q, k_pages_ref, v_pages_ref, table_ref, 0, num_blocks,
                          lambda k_pos: (k_pos <= context + q_idx) & (q_idx < chunk),
                          page_size=page_size, pages_per_block=pages_per_block)
  out = _softmax.finish(l, acc)
  out_idx = q_block * block_q + jax.lax.div(
      jax.lax.broadcasted_iota(jnp.int32, out.shape, 0), group)
  o_ref[...] = jnp.where(out_idx < chunk, out, 0.0).astype(o_ref.dtype)


def chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens, page_table, *,
                              sm_scale=None, block_q, pages_per_block, num_warps=4,
                              num_stages=2, interpret=False):
  """See `pallas_kernels.reference.chunked_prefill_attention` for the contract."""
  b, c, hq, d = q.shape
  hkv, num_pages, page_size, _ = k_pages.shape
  group = hq // hkv
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q = _softmax.pad_axis(q, 1, block_q)
  padded = q.shape[1]
  max_pages = page_table.shape[1]
  padded_pages = -(-max_pages // pages_per_block) * pages_per_block
  table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, padded_pages - max_pages)))
  rows = block_q * group
  kernel = functools.partial(_chunk_kernel, scale=scale, page_size=page_size,
                             pages_per_block=pages_per_block, block_q=block_q, group=group)
  out = pl.pallas_call(
      kernel,
      grid=(b, hkv, padded // block_q),
      in_specs=[pl.BlockSpec((b,), lambda bi, h, i: (0,)),
                pl.BlockSpec((b,), lambda bi, h, i: (0,)),
                pl.BlockSpec((None, padded_pages), lambda bi, h, i: (bi, 0)),
                pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, i, 0)),
                pl.BlockSpec((None, num_pages, page_size, d), lambda bi, h, i: (h, 0, 0, 0)),
                pl.BlockSpec((None, num_pages, page_size, d), lambda bi, h, i: (h, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, None, rows, d), lambda bi, h, i: (bi, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, padded * group, d), q.dtype),
      compiler_params=_compiler_params(num_warps, num_stages),
      interpret=interpret,
  )(context_lens.astype(jnp.int32), chunk_lens.astype(jnp.int32), table,
    _softmax.group_rows(q, hkv), k_pages, v_pages)
  return _softmax.ungroup_rows(out, c, hq)
