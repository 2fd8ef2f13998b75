"""What every kernel here shares: the online-softmax block update (flash attention's inner
step), its scratch, and the grouped-query row layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so a fully masked row never produces inf - inf = NaN


def _precision(a):
  # float32 operands get full float32 products (not TF32 on GPU, not one bf16 pass on TPU), so a
  # float32 model's attention matches the reference to 1e-5; bf16 operands are exact anyway.
  return jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None


def dot_nt(a, b):
  """a [M, D] · b [N, D]^T -> float32 [M, N]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                             preferred_element_type=jnp.float32)


def dot_nn(a, b):
  """a [M, N] · b [N, D] -> float32 [M, D]."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a),
                             preferred_element_type=jnp.float32)


def init_scratch(m_ref, l_ref, acc_ref) -> None:
  """Resets a kernel's running (max, denominator, accumulator) scratch."""
  m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
  l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def pad_axis(x, axis: int, multiple: int):
  """Pads `axis` of x with zeros up to a multiple of `multiple`."""
  size = x.shape[axis]
  padded = -(-size // multiple) * multiple
  if padded == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, padded - size)
  return jnp.pad(x, widths)


def group_rows(q, num_kv_heads: int):
  """[B, S, Hq, D] -> [B, Hkv, S * G, D], rows position-major: a block of rows is a block of
  positions times the G = Hq / Hkv query heads sharing one KV head."""
  b, s, hq, d = q.shape
  group = hq // num_kv_heads
  return q.reshape(b, s, num_kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(
      b, num_kv_heads, s * group, d)


def ungroup_rows(out, seq_len: int, num_heads: int):
  """The inverse of group_rows, keeping the first `seq_len` positions."""
  b, hkv, rows, d = out.shape
  s = rows // (num_heads // hkv)
  out = out.reshape(b, hkv, s, num_heads // hkv, d).transpose(0, 2, 1, 3, 4)
  return out.reshape(b, s, num_heads, d)[:, :seq_len]


def update(scores, mask, v, m_prev, l_prev, acc_prev, *, exp=jnp.exp):
  """Folds one block of keys into the running (max, denominator, accumulator).

  scores float32 [R, N] (already scaled; in log2 units when `exp` is jnp.exp2), mask bool [R, N]
  or None (every key visible), v [N, D]; m_prev, l_prev float32 [R, 1], acc_prev float32 [R, D]
  -> (m, l, acc).
  """
  if mask is not None:
    scores = jnp.where(mask, scores, MASK_VALUE)
  m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
  p = exp(scores - m_new)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  alpha = exp(m_prev - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_new = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
  return m_new, l_new, acc_new


def finish(l, acc):
  """acc / l, with rows that saw no key (l == 0) giving zeros."""
  return acc / jnp.where(l == 0.0, 1.0, l)
