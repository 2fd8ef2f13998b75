"""The attention kernels for NVIDIA GPUs, on Pallas's Triton backend.

Why Triton and not Mosaic GPU: on the H200 anchors (../shared/anchors), JAX's own Pallas attention
reached 316 TFLOP/s on Triton against 156 TFLOP/s (causal) on Mosaic GPU, and Triton's paged decode
1.68 TB/s; Mosaic GPU kernels need hand-written warpgroup pipelines to pass that. Revisit when
Triton is removed from Pallas.

Prefill: one program per (query head, query block), reading [B, S, H, D] in place. Paged decode and
chunked prefill: each program owns one (batch row, kv head) and the G = Hq/Hkv query heads that
share it, so each page is read once per group. Loops over key blocks / page blocks run inside the program (Triton has no
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
LOG2E = 1.4426950408889634  # scores are kept in log2 units: exp2 is one instruction


# Shared memory a Hopper block may use (227 KB). Triton keeps up to `num_stages` K/V tiles in
# flight there; measured on an H200, 128x128 bf16 tiles (64 KB of K+V) with 4 stages asked for
# 288 KB and failed to launch.
SMEM_BYTES = 232448


def fit_stages(num_stages: int, kv_tile_bytes: int, resident_bytes: int) -> int:
  """The most pipeline stages (at most `num_stages`, at least 1) whose K+V tiles plus the
  resident query tile fit in SMEM_BYTES, so float32 inputs or large tiles degrade to fewer
  stages instead of failing to launch."""
  stages = num_stages
  while stages > 1 and stages * kv_tile_bytes + resident_bytes > SMEM_BYTES:
    stages -= 1
  return stages


def _compiler_params(num_warps, num_stages):
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ------------------------------------------------------------------------------ prefill

def _prefill_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, causal, qk_scale, block_q,
                    block_k, num_q_blocks):
  b, q_block = pl.program_id(2), num_q_blocks - 1 - pl.program_id(1)
  length = lengths_ref[b]
  q_start = q_block * block_q
  q = q_ref[...]
  last_key = length - 1
  if causal:
    last_key = jnp.minimum(last_key, q_start + block_q - 1)
  num_blocks = jnp.where(q_start < length, last_key // block_k + 1, 0)
  # Key blocks every query of this block sees whole need no mask: the causal diagonal and the
  # ragged end are the only masked blocks.
  visible = jnp.minimum(length, q_start + 1) if causal else length
  full_blocks = jnp.minimum(visible // block_k, num_blocks)
  q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

  def body(kb, carry, masked):
    k_start = kb * block_k
    k = k_ref[pl.ds(k_start, block_k), :]
    v = v_ref[pl.ds(k_start, block_k), :]
    scores = _softmax.dot_nt(q, k) * qk_scale
    mask = None
    if masked:
      k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
      mask = k_pos < length
      if causal:
        mask = mask & (k_pos <= q_pos)
    return _softmax.update(scores, mask, v, *carry, exp=jnp.exp2)

  init = (jnp.full((block_q, 1), _softmax.MASK_VALUE, jnp.float32),
          jnp.zeros((block_q, 1), jnp.float32), jnp.zeros((block_q, q.shape[-1]), jnp.float32))
  carry = jax.lax.fori_loop(0, full_blocks, functools.partial(body, masked=False), init)
  _, l, acc = jax.lax.fori_loop(full_blocks, num_blocks, functools.partial(body, masked=True),
                                carry)
  out = _softmax.finish(l, acc)
  out_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, out.shape, 0)
  o_ref[...] = jnp.where(out_pos < length, out, 0.0).astype(o_ref.dtype)


def prefill_attention(q, k, v, lengths, *, causal=True, sm_scale=None, block_q, block_k,
                      num_warps=4, num_stages=2, interpret=False):
  """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; lengths int32[B] -> [B, S, Hq, D].

  Reads and writes the [B, S, H, D] layout in place (no transposes around the kernel): one
  program per (query head, query block, batch row), the heads sharing a KV head adjacent in the
  launch order so their K/V reads hit L2, and the longest causal blocks launched first.
  """
  b, s, hq, d = q.shape
  group = hq // k.shape[2]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q, k, v = (_softmax.pad_axis(x, 1, max(block_q, block_k)) for x in (q, k, v))
  padded = q.shape[1]
  num_q_blocks = padded // block_q
  kernel = functools.partial(_prefill_kernel, causal=causal, qk_scale=scale * LOG2E,
                             block_q=block_q, block_k=block_k, num_q_blocks=num_q_blocks)
  q_map = lambda h, i, bi: (bi, num_q_blocks - 1 - i, h, 0)
  kv_map = lambda h, i, bi: (bi, 0, h // group, 0)
  out = pl.pallas_call(
      kernel,
      grid=(hq, num_q_blocks, b),
      in_specs=[pl.BlockSpec((b,), lambda h, i, bi: (0,)),
                pl.BlockSpec((None, block_q, None, d), q_map),
                pl.BlockSpec((None, padded, None, d), kv_map),
                pl.BlockSpec((None, padded, None, d), kv_map)],
      out_specs=pl.BlockSpec((None, block_q, None, d), q_map),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(
          num_warps, fit_stages(num_stages, 2 * block_k * d * k.dtype.itemsize,
                                block_q * d * q.dtype.itemsize)),
      interpret=interpret,
  )(lengths.astype(jnp.int32), q, k, v)
  return out[:, :s]


# ------------------------------------------------------------------------------ paged

def _paged_loop(q, k_pages_ref, v_pages_ref, table_ref, first_page, num_blocks, mask_fn, *,
                qk_scale, page_size, pages_per_block):
  """Online softmax over `num_blocks` blocks of `pages_per_block` pages from `first_page` on."""
  rows, d = q.shape
  block_k = pages_per_block * page_size

  def body(i, carry):
    start = first_page + i * pages_per_block
    page_ids = table_ref[pl.ds(start, pages_per_block)]
    k = k_pages_ref[page_ids].reshape(block_k, d)
    v = v_pages_ref[page_ids].reshape(block_k, d)
    scores = _softmax.dot_nt(q, k) * qk_scale
    k_pos = start * page_size + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    return _softmax.update(scores, mask_fn(k_pos), v, *carry, exp=jnp.exp2)

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
  m, l, acc = _paged_loop(q_ref[...], k_pages_ref, v_pages_ref, table_ref, first_page,
                          num_blocks, lambda k_pos: k_pos < length, qk_scale=scale * LOG2E,
                          page_size=page_size, pages_per_block=pages_per_block)
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
      compiler_params=_compiler_params(
          num_warps, fit_stages(num_stages, 2 * pages_per_block * page_size * d
                                * k_pages.dtype.itemsize, rows * d * q.dtype.itemsize)),
      interpret=interpret,
  )(lengths.astype(jnp.int32), table, q_rows, k_pages, v_pages)
  out = combine_splits(acc, m, l, exp=jnp.exp2)[:, :, :group]
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
  _, l, acc = _paged_loop(q_ref[...], k_pages_ref, v_pages_ref, table_ref, 0, num_blocks,
                          lambda k_pos: (k_pos <= context + q_idx) & (q_idx < chunk),
                          qk_scale=scale * LOG2E, page_size=page_size,
                          pages_per_block=pages_per_block)
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
      compiler_params=_compiler_params(
          num_warps, fit_stages(num_stages, 2 * pages_per_block * page_size * d
                                * k_pages.dtype.itemsize, rows * d * q.dtype.itemsize)),
      interpret=interpret,
  )(context_lens.astype(jnp.int32), chunk_lens.astype(jnp.int32), table,
    _softmax.group_rows(q, hkv), k_pages, v_pages)
  return _softmax.ungroup_rows(out, c, hq)
