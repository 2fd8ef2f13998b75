"""The online-softmax block update every kernel here shares (flash attention's inner step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = -1e30  # finite, so a fully masked row never produces inf - inf = NaN


def dot_nt(a, b):
  """a [M, D] · b [N, D]^T -> float32 [M, N]."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
  """a [M, N] · b [N, D] -> float32 [M, D]."""
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def update(scores, mask, v, m_prev, l_prev, acc_prev):
  """Folds one block of keys into the running (max, denominator, accumulator).

  scores float32 [R, N] (already scaled), mask bool [R, N], v [N, D];
  m_prev, l_prev float32 [R, 1], acc_prev float32 [R, D] -> (m, l, acc).
  """
  scores = jnp.where(mask, scores, MASK_VALUE)
  m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
  p = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
  alpha = jnp.exp(m_prev - m_new)
  l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_new = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
  return m_new, l_new, acc_new


def finish(l, acc):
  """acc / l, with rows that saw no key (l == 0) giving zeros."""
  return acc / jnp.where(l == 0.0, 1.0, l)
