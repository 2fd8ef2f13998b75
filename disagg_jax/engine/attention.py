"""The model's attention for each kind of step: where K/V go and which kernel reads them.

Each class is built inside a jitted step from that step's arrays and passed to the model as its
`Attention`; all kernel choices go through `pallas_kernels.dispatch`, and everything that touches
the page pool or calls a kernel runs per shard (`PoolLayout.run`): rows over dp, heads over tp.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec as P

from disagg_jax import parallel
from disagg_jax.kv import cache as kv_cache
from disagg_jax.kv.layout import HEADS, ROWS, PoolLayout
from pallas_kernels import dispatch


@dataclasses.dataclass(frozen=True)
class PromptAttention:
  """Whole right-padded prompts at once; the layer's "cache" out is its dense K/V.

  q: [B, S, Hq, D], k/v: [B, S, Hkv, D]; lengths int32[B].
  """
  lengths: jax.Array
  impl: str
  layout: PoolLayout | None = None  # None: one device (training, tests)

  def __call__(self, layer, q, k, v, layer_cache):
    del layer, layer_cache

    def attend(q, k, v, lengths):
      return dispatch.prefill(q, k, v, lengths, impl=self.impl)

    if self.layout is None:
      return attend(q, k, v, self.lengths), kv_cache.LayerKV(k, v)
    expand = self.layout.expand_heads
    out = self.layout.run(attend, (HEADS, HEADS, HEADS, ROWS), HEADS,
                          q, expand(k), expand(v), self.lengths)
    return out, kv_cache.LayerKV(k, v)


@dataclasses.dataclass(frozen=True)
class PagedAttention:
  """New tokens appended to a paged cache, then attended against everything cached before them.

  q: [B, C, Hq, D], k/v: [B, C, Hkv, D] for a chunk of C tokens per row (C = 1 for decode).
  context_lens int32[B]: tokens already cached; chunk_lens int32[B] <= C: real tokens in the chunk
  (0 for an idle row); page_table int32[B, W] of global page ids, W pages covering every row's
  context and chunk.
  """
  page_table: jax.Array
  context_lens: jax.Array
  chunk_lens: jax.Array
  page_size: int
  impl: str
  layout: PoolLayout

  def __call__(self, layer, q, k, v, layer_cache: kv_cache.LayerPages):
    del layer
    layout = self.layout

    def write_and_attend(q, k, v, pages, page_table, context_lens, chunk_lens):
      c = q.shape[1]
      num_local = pages.k.shape[1]
      offsets = jax.numpy.arange(c)[None, :]
      positions = context_lens[:, None] + offsets
      valid = offsets < chunk_lens[:, None]
      page_ids, slots = kv_cache.token_slots(page_table, positions, valid, -1, self.page_size)
      page_ids = kv_cache.localize(page_ids, num_local, layout.page_offset(num_local))
      pages = kv_cache.write_tokens(pages, k, v, page_ids, slots)
      table = layout.local_table(page_table, num_local)
      if c == 1:
        out = dispatch.paged_decode(q[:, 0], pages.k, pages.v, context_lens + chunk_lens, table,
                                    impl=self.impl)[:, None]
      else:
        out = dispatch.chunked_prefill(q, pages.k, pages.v, context_lens, chunk_lens, table,
                                       impl=self.impl)
      return out, pages

    return layout.run(
        write_and_attend, (HEADS, HEADS, HEADS, parallel.POOL_SPEC, ROWS, ROWS, ROWS),
        (HEADS, parallel.POOL_SPEC), q, layout.expand_heads(k), layout.expand_heads(v),
        layer_cache, self.page_table, self.context_lens, self.chunk_lens)


@dataclasses.dataclass(frozen=True)
class MixedAttention:
  """One decode token per slot and a batch of prefill chunks in the same forward pass.

  The model runs on tokens laid out [dp, B / dp + Bc / dp * C]: each dp row's decode tokens, then
  its chunk rows' tokens, so the projections and MLP read their weights once for both and every
  dp row computes only its own rows. Attention splits them: the decode part is `decode` (C = 1),
  the rest `chunks` (C = chunk size), each against the shared page pool.
  """
  decode: PagedAttention
  chunks: PagedAttention

  def split(self, x):
    """[dp, B/dp + Bc/dp * C, ...] -> ([B, ...], [Bc, C, ...])."""
    n = x.shape[0]
    b = self.decode.page_table.shape[0]
    bc = self.chunks.page_table.shape[0]
    return (x[:, :b // n].reshape(b, *x.shape[2:]),
            x[:, b // n:].reshape(bc, -1, *x.shape[2:]))

  @staticmethod
  def join(decode_part, chunk_part, n: int):
    """The inverse of `split`, for n dp rows."""
    return jax.numpy.concatenate([decode_part.reshape(n, -1, *decode_part.shape[1:]),
                                  chunk_part.reshape(n, -1, *chunk_part.shape[2:])], axis=1)

  def __call__(self, layer, q, k, v, layer_cache):
    (qd, qc), (kd, kc), (vd, vc) = self.split(q), self.split(k), self.split(v)
    out_d, layer_cache = self.decode(layer, qd[:, None], kd[:, None], vd[:, None], layer_cache)
    out_c, layer_cache = self.chunks(layer, qc, kc, vc, layer_cache)
    return self.join(out_d[:, 0], out_c, q.shape[0]), layer_cache


def rows_constraint(x, layout: PoolLayout):
  """Pins an array's leading (row) axis to dp."""
  if not layout.sharded:
    return x
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(layout.mesh, P(parallel.DP)))
