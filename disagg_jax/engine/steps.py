"""The engine's pure device functions, jit-compiled once per shape bucket.

    prefill(params, tokens, lengths, sampling)                -> (first tokens, logits, prompt KV)
    insert(kv_pages*, prompt_kv, page_ids)                    -> kv_pages
    decode(params, kv_pages*, tokens, positions, page_table, sampling, rows)
                                                              -> (tokens, kv_pages)
  The serving engine's variants keep each slot's next input token on device:
    make_extract(plan)(prompt_kv, row)                        -> one request's KV, packed
    insert_prefix(kv_pages*, tokens, prefix_kv, page_ids, slot, token) -> (kv_pages, tokens)
    mixed(params, kv_pages*, tokens, positions, page_table, sampling, chunk...)
                                                              -> (tokens, kv_pages)

(* donated: the page pool is updated in place.) Everything is an explicit pytree: `params` is the
model's `nnx.State`, `kv_pages` a list of `LayerPages`, the prompt KV a list of `LayerKV`.
Per-row arrays (tokens, positions, page tables, sampling settings) split over the mesh's dp axis
with the page pool (`disagg_jax.kv.layout`); page tables are [B, W] with W a width bucket covering
the step's longest sequence, so short contexts never pay for max_seq_len.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from disagg_jax import parallel
from disagg_jax.engine.compiled import Step
from disagg_jax.engine.attention import (MixedAttention, PagedAttention, PromptAttention,
                                         rows_constraint)
from disagg_jax.engine.sampling import SamplingArrays, sample
from disagg_jax.kv import cache as kv_cache
from disagg_jax.kv import layout as kv_layout
from disagg_jax.models.loading import Model
from disagg_jax.transfer.plan import TransferPlan


class PrefillResult(NamedTuple):
  tokens: jax.Array  # int32[B], the first generated token of each prompt
  logits: jax.Array  # float32[B, V], at each prompt's last position
  kv: list  # list[LayerKV], each [B, S, Hkv, D]


class ModelSteps:
  """The jitted step functions of one model on one mesh."""

  def __init__(self, model: Model, *, page_size: int, attention_impl: str = "auto"):
    self.cfg = model.cfg
    self.mesh = model.mesh
    self.graphdef = model.graphdef
    self.page_size = page_size
    self.attention_impl = attention_impl
    self.dtype = model.dtype
    self.layout = kv_layout.PoolLayout.create(self.cfg, self.mesh)
    self.dp = self.layout.dp
    rows = parallel.batch_sharding(self.mesh)
    pages = parallel.kv_pages_sharding(self.mesh)
    dense = parallel.dense_kv_sharding(self.cfg, self.mesh)
    self.pages_sharding = pages
    self.rows = rows
    self.replicated = parallel.replicated(self.mesh)
    self.prefill = Step("prefill", jax.jit(self._prefill,
                                           out_shardings=PrefillResult(rows, rows, dense)))
    self.insert = Step("insert", jax.jit(self._insert, donate_argnums=(0,), out_shardings=pages))
    self.decode = Step("decode", jax.jit(self._decode, donate_argnums=(1,),
                                         out_shardings=(rows, pages)))
    # Only the page pool is donated: the engine keeps reading a step's token array after
    # dispatching the next step (it is tiny anyway).
    self.insert_prefix = Step("insert_prefix", jax.jit(self._insert_prefix, donate_argnums=(0,),
                                                       out_shardings=(pages, rows)))
    self.mixed = Step("mixed", jax.jit(self._mixed, donate_argnums=(1,),
                                       out_shardings=(rows, pages)))

  def all_steps(self) -> list[Step]:
    return [self.prefill, self.insert, self.decode, self.insert_prefix, self.mixed]

  def put_rows(self, *arrays):
    """Host arrays -> device arrays with their rows over dp (what the steps expect)."""
    return jax.device_put(arrays, self.rows)

  def init_pages(self, num_pages: int) -> kv_cache.KVPages:
    """A zeroed page pool on this mesh (num_pages: a multiple of dp, one block per dp row)."""
    return kv_layout.init_pages(self.cfg, self.layout, num_pages, self.page_size, self.dtype)

  def _model(self, params):
    return nnx.merge(self.graphdef, params)

  def _paged(self, page_table, context_lens, chunk_lens) -> PagedAttention:
    return PagedAttention(page_table, context_lens, chunk_lens, self.page_size,
                          self.attention_impl, self.layout)

  def _prefill(self, params, tokens, lengths, sampling: SamplingArrays) -> PrefillResult:
    """tokens int32[B, S] right-padded, lengths int32[B] (0 for a padding row)."""
    model = self._model(params)
    tokens = rows_constraint(tokens, self.layout)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    attention = PromptAttention(lengths, self.attention_impl, self.layout)
    hidden, kv = model(tokens, positions, attention)
    last = jnp.maximum(lengths - 1, 0)
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logits = model.logits(hidden_last)
    return PrefillResult(sample(logits, sampling, last), logits, kv)

  def _insert(self, kv_pages, prompt_kv, page_ids):
    """prompt_kv [B, S, Hkv, D] per layer, rows over dp; page_ids int32[B, S // page_size]: the
    page of each prompt block (from the row's dp block), num_pages to skip it."""
    return self.layout.write_prompts(kv_pages, prompt_kv, page_ids)

  def _decode(self, params, kv_pages, tokens, positions, page_table, sampling: SamplingArrays,
              rows):
    """Decodes the batch rows `rows` int32[R] (R <= B; each dp row's share of them from its own
    rows): tokens int32[B] holds each row's token at `positions` int32[B] (-1: idle); the rows'
    tokens are appended to their pages and attended, and `tokens` comes back with each active
    row's sampled next token. page_table int32[B, W], sampling settings [B]. Computing only the
    rows in use keeps a lightly loaded batch cheap."""
    model = self._model(params)
    gather = lambda x: x[rows]
    position = gather(positions)
    active = position >= 0
    context = jnp.maximum(position, 0)
    attention = self._paged(gather(page_table), context, active.astype(jnp.int32))
    current = gather(tokens)
    hidden, kv_pages = model(rows_constraint(current[:, None], self.layout), context[:, None],
                             attention, kv_pages)
    logits = model.logits(hidden[:, 0])
    sampled = sample(logits, jax.tree.map(gather, sampling), context)
    return tokens.at[rows].set(jnp.where(active, sampled, current)), kv_pages

  # ------------------------------------------------------------------ serving-engine variants

  def make_extract(self, plan: TransferPlan):
    """extract(prompt_kv, row): one row of a prefill batch's KV (list[LayerKV [B, S, Hkv, D]]),
    packed into the arrays `plan` moves to the decode mesh."""
    def extract(prompt_kv, row):
      stacked = jnp.stack([jnp.stack([kv.k[row], kv.v[row]]) for kv in prompt_kv])
      return plan.pack(stacked)  # [L, 2, S, Hkv, D] -> the plan's source layout
    return Step("extract", jax.jit(extract, out_shardings=plan.source_shardings))

  def _insert_prefix(self, kv_pages, tokens, prefix_blocks, page_ids, slot, token):
    """Writes one request's KV, as it arrives ([d, L, 2, S, Hkv/d, D], see TransferPlan; the same
    on every dp row), into its pages (int32[S / ps], num_pages to skip; all from the dp block of
    `slot`) and sets its slot's next input token."""
    prefix_kv = TransferPlan.unpack(prefix_blocks)
    batched = [kv_cache.LayerKV(layer[0][None], layer[1][None]) for layer in prefix_kv]
    kv_pages = self.layout.write_prompts(kv_pages, batched, page_ids[None], rows_sharded=False)
    return kv_pages, tokens.at[slot].set(token)

  def _mixed(self, params, kv_pages, tokens, positions, page_table, sampling: SamplingArrays,
             chunk_tokens, chunk_slots, chunk_context, chunk_lens, chunk_final):
    """One continuous-batching step: every slot with positions >= 0 decodes one token, and
    chunk_tokens int32[Bc, C] extend the prompts of slots chunk_slots (B for a padding row) at
    positions chunk_context + [0, chunk_lens). Chunk row i belongs to dp row i // (Bc / dp), as
    its slot does. A chunk marked final samples its request's first token into `tokens`; decode
    rows sample their next one. Idle slots keep their token."""
    model = self._model(params)
    n = self.dp
    b, (bc, c) = tokens.shape[0], chunk_tokens.shape
    active = positions >= 0
    context = jnp.maximum(positions, 0)
    safe_slots = jnp.minimum(chunk_slots, b - 1)
    chunk_table = jnp.where((chunk_slots < b)[:, None], page_table[safe_slots], 0)
    attention = MixedAttention(decode=self._paged(page_table, context, active.astype(jnp.int32)),
                               chunks=self._paged(chunk_table, chunk_context, chunk_lens))
    chunk_positions = chunk_context[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    flat_tokens = rows_constraint(MixedAttention.join(tokens, chunk_tokens, n), self.layout)
    flat_positions = MixedAttention.join(context, chunk_positions, n)
    hidden, kv_pages = model(flat_tokens, flat_positions, attention, kv_pages)
    decode_hidden, chunk_hidden = attention.split(hidden)
    last = jnp.maximum(chunk_lens - 1, 0)
    chunk_last = jnp.take_along_axis(chunk_hidden, last[:, None, None], axis=1)[:, 0]
    # One logits matmul and one sampler for the decode rows and the chunks' last tokens.
    rows = jnp.concatenate([decode_hidden, chunk_last])
    row_sampling = jax.tree.map(lambda x, y: jnp.concatenate([x, y[safe_slots]]), sampling,
                                sampling)
    sampled = sample(model.logits(rows), row_sampling,
                     jnp.concatenate([context, chunk_context + last]))
    tokens = jnp.where(active, sampled[:b], tokens)
    first = sampled[b:]
    write_to = jnp.where(chunk_final, chunk_slots, b)  # b: dropped
    return tokens.at[write_to].set(first, mode="drop"), kv_pages
