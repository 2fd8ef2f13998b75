"""Causal flash attention for prefill, written for Pallas TPU (runs on CPU in TPU interpret mode).

Layout: each (batch, kv head) owns a row block of `block_q` query positions x G = Hq/Hkv heads,
flattened position-major into [block_q * G, D], so one matmul serves the whole query group against
a [block_k, D] key block. The grid is (B, Hkv, query blocks, key blocks) with keys innermost
("arbitrary", the reduction); the running max / denominator / accumulator live in VMEM scratch.

Key blocks past the causal diagonal or the sequence's length are skipped, and their index map is
clamped to the last useful block so the pipeline does not fetch them either. `lengths` reach the
index maps through scalar prefetch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _softmax


def _last_key_block(q_block, length, *, block_q, block_k, causal):
  """The last key block that query block `q_block` of a `length`-token sequence needs."""
  last_key = jnp.maximum(length - 1, 0)
  if causal:
    last_key = jnp.minimum(last_key, (q_block + 1) * block_q - 1)
  return last_key // block_k


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref, *, causal, scale,
            block_q, block_k, group):
  b, q_block, k_block = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  rows = block_q * group

  @pl.when(k_block == 0)
  def _init():
    _softmax.init_scratch(m_ref, l_ref, acc_ref)

  q_start, k_start = q_block * block_q, k_block * block_k
  needed = (k_start < length) & (q_start < length)
  if causal:
    needed = needed & (k_start <= q_start + block_q - 1)

  @pl.when(needed)
  def _accumulate():
    scores = _softmax.dot_nt(q_ref[...], k_ref[...]) * scale  # [rows, block_k]
    q_pos = q_start + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0), group)
    k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    mask = k_pos < length
    if causal:
      mask = mask & (k_pos <= q_pos)
    m, l, acc = _softmax.update(scores, mask, v_ref[...], m_ref[...], l_ref[...], acc_ref[...])
    m_ref[...], l_ref[...], acc_ref[...] = m, l, acc

  @pl.when(k_block == pl.num_programs(3) - 1)
  def _store():
    out = _softmax.finish(l_ref[...], acc_ref[...])
    q_pos = q_start + jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, out.shape, 0), group)
    o_ref[...] = jnp.where(q_pos < length, out, 0.0).astype(o_ref.dtype)


def prefill_attention(q, k, v, lengths, *, causal=True, sm_scale=None, block_q, block_k,
                      interpret=False):
  """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; lengths int32[B] -> [B, S, Hq, D].

  S is padded up to a multiple of the blocks; `interpret` runs the kernel in TPU interpret mode.
  """
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  group = hq // hkv
  scale = d ** -0.5 if sm_scale is None else sm_scale
  q, k, v = (_softmax.pad_axis(x, 1, max(block_q, block_k)) for x in (q, k, v))
  padded = q.shape[1]
  q_rows = _softmax.group_rows(q, hkv)  # a query block: block_q positions x G heads
  k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
  rows = block_q * group
  last = functools.partial(_last_key_block, block_q=block_q, block_k=block_k, causal=causal)

  def q_map(bi, h, qi, ki, lengths_ref):
    del ki, lengths_ref
    return bi, h, qi, 0

  def kv_map(bi, h, qi, ki, lengths_ref):
    return bi, h, jnp.minimum(ki, last(qi, lengths_ref[bi])), 0

  kernel = functools.partial(_kernel, causal=causal, scale=scale, block_q=block_q,
                             block_k=block_k, group=group)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, hkv, padded // block_q, padded // block_k),
          in_specs=[pl.BlockSpec((None, None, rows, d), q_map),
                    pl.BlockSpec((None, None, block_k, d), kv_map),
                    pl.BlockSpec((None, None, block_k, d), kv_map)],
          out_specs=pl.BlockSpec((None, None, rows, d), q_map),
          scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32),
                          pltpu.VMEM((rows, 1), jnp.float32),
                          pltpu.VMEM((rows, d), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(lengths.astype(jnp.int32), q_rows, k_t, v_t)
  return _softmax.ungroup_rows(out, s, hq)
