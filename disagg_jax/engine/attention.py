"""The model's attention for each kind of step: where K/V go and which kernel reads them.

Each class is built inside a jitted step from that step's arrays and passed to the model as its
`Attention`; all kernel choices go through `pallas_kernels.dispatch`.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh

from disagg_jax.kv import cache as kv_cache
from pallas_kernels import dispatch


@dataclasses.dataclass(frozen=True)
class PromptAttention:
  """Whole right-padded prompts at once; the layer's "cache" out is its dense K/V.

  q: [B, S, Hq, D], k/v: [B, S, Hkv, D]; lengths int32[B].
  """
  lengths: jax.Array
  impl: str
  mesh: Mesh | None = None

  def __call__(self, layer, q, k, v, layer_cache):
    del layer, layer_cache
    out = dispatch.prefill(q, k, v, self.lengths, impl=self.impl, mesh=self.mesh)
    return out, kv_cache.LayerKV(k, v)


@dataclasses.dataclass(frozen=True)
class PagedAttention:
  """New tokens appended to a paged cache, then attended against everything cached before them.

  q: [B, C, Hq, D], k/v: [B, C, Hkv, D] for a chunk of C tokens per row (C = 1 for decode).
  context_lens int32[B]: tokens already cached; chunk_lens int32[B] <= C: real tokens in the chunk
  (0 for an idle row); page_table int32[B, max_pages].
  """
  page_table: jax.Array
  context_lens: jax.Array
  chunk_lens: jax.Array
  page_size: int
  impl: str
  mesh: Mesh | None = None

  def __call__(self, layer, q, k, v, layer_cache: kv_cache.LayerPages):
    del layer
    c = q.shape[1]
    offsets = jax.numpy.arange(c)[None, :]
    positions = self.context_lens[:, None] + offsets
    valid = offsets < self.chunk_lens[:, None]
    num_pages = layer_cache.k.shape[1]
    page_ids, slots = kv_cache.token_slots(self.page_table, positions, valid, num_pages,
                                           self.page_size)
    layer_cache = kv_cache.write_tokens(layer_cache, k, v, page_ids, slots)
    if c == 1:
      out = dispatch.paged_decode(q[:, 0], layer_cache.k, layer_cache.v,
                                  self.context_lens + self.chunk_lens, self.page_table,
                                  impl=self.impl, mesh=self.mesh)[:, None]
    else:
      out = dispatch.chunked_prefill(q, layer_cache.k, layer_cache.v, self.context_lens,
                                     self.chunk_lens, self.page_table, impl=self.impl,
                                     mesh=self.mesh)
    return out, layer_cache


@dataclasses.dataclass(frozen=True)
class MixedAttention:
  """One decode token per slot and a batch of prefill chunks in the same forward pass.

  The model runs on the flat token list [decode tokens (B) ++ chunk tokens (Bc * C)], so the
  projections and MLP read their weights once for both; only attention splits: the first B rows are
  `decode` (C = 1), the rest `chunks` (C = chunk size), each against the shared page pool.
  """
  decode: PagedAttention
  chunks: PagedAttention
  num_decode: int

  def __call__(self, layer, q, k, v, layer_cache):
    b = self.num_decode
    bc = self.chunks.page_table.shape[0]

    def split(x):
      return x[:b, None], x[b:].reshape(bc, -1, *x.shape[1:])

    (qd, qc), (kd, kc), (vd, vc) = split(q), split(k), split(v)
    out_d, layer_cache = self.decode(layer, qd, kd, vd, layer_cache)
    out_c, layer_cache = self.chunks(layer, qc, kc, vc, layer_cache)
    return jax.numpy.concatenate([out_d[:, 0], out_c.reshape(-1, *out_c.shape[2:])]), layer_cache
