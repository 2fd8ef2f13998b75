"""Pure-JAX reference attention: the XLA path on CPU and the ground truth for the Pallas kernels.

All three share one convention: rows and query positions with no valid key produce zeros (never
NaN), softmax runs in float32, and Hq is a multiple of Hkv (grouped-query attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30


def _scale(sm_scale, head_dim):
  return head_dim ** -0.5 if sm_scale is None else sm_scale


def _masked_softmax_av(scores, mask, v, out_dtype, contract):
  """scores float32 with `mask`; rows without a valid key give 0. `contract` is the einsum of
  probabilities against v."""
  scores = jnp.where(mask, scores, _MASKED)
  scores = scores - jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.where(mask, jnp.exp(scores), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom == 0.0, 1.0, denom)
  return jnp.einsum(contract, p, v.astype(jnp.float32)).astype(out_dtype)


def prefill_attention(q, k, v, lengths, *, causal=True, sm_scale=None, q_start=0):
  """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; lengths: int32[B] (right padding) -> [B, S, Hq, D].

  `q_start` offsets the queries' positions: q may be a block of queries starting there, against
  all S keys (q [B, Sq, Hq, D] -> [B, Sq, Hq, D])."""
  b, sq, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  qg = q.reshape(b, sq, hkv, hq // hkv, d)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  scores = scores * _scale(sm_scale, d)
  q_pos = q_start + jnp.arange(sq)
  k_pos = jnp.arange(s)
  mask = ((q_pos[None, :, None] < lengths[:, None, None])
          & (k_pos[None, None, :] < lengths[:, None, None]))  # [B, Sq, Sk]
  if causal:
    mask = mask & (k_pos[None, :] <= q_pos[:, None])[None]
  out = _masked_softmax_av(scores, mask[:, None, None], v, q.dtype, "bhgqk,bkhd->bqhgd")
  return out.reshape(b, sq, hq, d)


def prefill_attention_blocked(q, k, v, lengths, *, causal=True, sm_scale=None, block=512):
  """`prefill_attention` computed `block` queries at a time (a sequential loop), so the scores
  of long prompts take [block, S] per head, not [S, S]. Same results."""
  s = q.shape[1]
  if s <= 2 * block or s % block:
    return prefill_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale)
  b, _, hq, d = q.shape
  blocks = jnp.moveaxis(q.reshape(b, s // block, block, hq, d), 1, 0)
  starts = jnp.arange(s // block) * block

  def one(args):
    q_block, start = args
    return prefill_attention(q_block, k, v, lengths, causal=causal, sm_scale=sm_scale,
                             q_start=start)

  out = jax.lax.map(one, (blocks, starts))  # [S / block, B, block, Hq, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, s, hq, d)


def gather_pages(pages, page_table):
  """pages: [Hkv, P, page_size, D]; page_table: int32[B, max_pages] -> [Hkv, B, max_pages*page_size, D].

  Heads stay the leading axis, as in the pool: the attention einsums then batch over (head, row)
  without transposing the gathered keys and values (a copy as large as the context)."""
  hkv, _, page_size, d = pages.shape
  b, max_pages = page_table.shape
  gathered = jnp.take(pages, page_table.reshape(-1), axis=1, mode="clip")
  return gathered.reshape(hkv, b, max_pages * page_size, d)


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, *, sm_scale=None):
  """q: [B, Hq, D]; k/v pages: [Hkv, P, page_size, D]; lengths: int32[B];
  page_table: int32[B, max_pages] -> [B, Hq, D]."""
  b, hq, d = q.shape
  hkv = k_pages.shape[0]
  k = gather_pages(k_pages, page_table)  # [Hkv, B, T, D]
  v = gather_pages(v_pages, page_table)
  qg = jnp.swapaxes(q.reshape(b, hkv, hq // hkv, d), 0, 1)  # [Hkv, B, G, D]
  scores = jnp.einsum("hbgd,hbkd->hbgk", qg, k, preferred_element_type=jnp.float32)
  scores = scores * _scale(sm_scale, d)
  mask = jnp.arange(k.shape[2])[None, :] < lengths[:, None]  # [B, T]
  out = _masked_softmax_av(scores, mask[None, :, None, :], v, q.dtype, "hbgk,hbkd->hbgd")
  return jnp.swapaxes(out, 0, 1).reshape(b, hq, d)


def chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens, page_table, *,
                              sm_scale=None):
  """A chunk of new query tokens against the sequence's cached pages, causally.

  q: [B, C, Hq, D], the chunk's queries; query i sits at position context_lens[b] + i.
  k/v pages: [Hkv, P, page_size, D], already holding the chunk's own keys and values.
  context_lens: int32[B], tokens cached before the chunk; chunk_lens: int32[B] <= C, the chunk's
  real length (queries at i >= chunk_lens[b] give zeros).
  page_table: int32[B, max_pages] -> [B, C, Hq, D].
  Decode is the special case C = 1, chunk_lens = 1.
  """
  b, c, hq, d = q.shape
  hkv = k_pages.shape[0]
  k = gather_pages(k_pages, page_table)  # [Hkv, B, T, D]
  v = gather_pages(v_pages, page_table)
  qg = jnp.transpose(q.reshape(b, c, hkv, hq // hkv, d), (2, 0, 1, 3, 4))  # [Hkv, B, C, G, D]
  scores = jnp.einsum("hbqgd,hbkd->hbqgk", qg, k, preferred_element_type=jnp.float32)
  scores = scores * _scale(sm_scale, d)
  q_pos = context_lens[:, None] + jnp.arange(c)[None, :]  # [B, C]
  k_pos = jnp.arange(k.shape[2])  # [T]
  q_valid = jnp.arange(c)[None, :] < chunk_lens[:, None]  # [B, C]
  mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & q_valid[:, :, None]  # [B, C, T]
  out = _masked_softmax_av(scores, mask[None, :, :, None], v, q.dtype, "hbqgk,hbkd->hbqgd")
  return jnp.transpose(out, (1, 2, 0, 3, 4)).reshape(b, c, hq, d)
