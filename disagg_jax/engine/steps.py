"""The engine's pure device functions, jit-compiled once per shape bucket.

    prefill(params, tokens, lengths, sampling)                -> (first tokens, logits, prompt KV)
    insert(kv_pages*, prompt_kv, page_ids)                    -> kv_pages
    decode(params, kv_pages*, tokens, positions, page_table, sampling) -> (next tokens, kv_pages)
    chunk(params, kv_pages*, tokens, context_lens, chunk_lens, page_table, sampling)
                                                              -> (next tokens, logits, kv_pages)
  The serving engine's variants keep each slot's next input token on device:
    make_extract(plan)(prompt_kv, row)                        -> one request's KV, packed
    insert_prefix(kv_pages*, tokens, prefix_kv, page_ids, slot, token) -> (kv_pages, tokens)
    mixed(params, kv_pages*, tokens, positions, page_table, sampling, chunk...)
                                                              -> (tokens, kv_pages)

(* donated: the page pool is updated in place.) Everything is an explicit pytree: `params` is the
model's `nnx.State`, `kv_pages` a list of `LayerPages`, the prompt KV a list of `LayerKV`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from disagg_jax import parallel
from disagg_jax.engine.attention import MixedAttention, PagedAttention, PromptAttention
from disagg_jax.engine.sampling import SamplingArrays, sample
from disagg_jax.kv import cache as kv_cache
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
    rep = parallel.replicated(self.mesh)
    pages = parallel.kv_pages_sharding(self.cfg, self.mesh)
    dense = parallel.dense_kv_sharding(self.cfg, self.mesh)
    self.pages_sharding = pages
    self.replicated = rep
    self.prefill = jax.jit(self._prefill, out_shardings=PrefillResult(rep, rep, dense))
    self.insert = jax.jit(self._insert, donate_argnums=(0,), out_shardings=pages)
    self.decode = jax.jit(self._decode, donate_argnums=(1,), out_shardings=(rep, pages))
    self.chunk = jax.jit(self._chunk, donate_argnums=(1,), out_shardings=(rep, rep, pages))
    # Only the page pool is donated: the engine keeps reading a step's token array after
    # dispatching the next step (it is tiny anyway).
    self.insert_prefix = jax.jit(self._insert_prefix, donate_argnums=(0,),
                                 out_shardings=(pages, rep))
    self.mixed = jax.jit(self._mixed, donate_argnums=(1,), out_shardings=(rep, pages))

  def init_pages(self, num_pages: int) -> kv_cache.KVPages:
    """A zeroed page pool on this mesh."""
    cfg = self.cfg
    make = jax.jit(
        lambda: kv_cache.init_pages(cfg.num_layers, cfg.num_kv_heads, num_pages, self.page_size,
                                    cfg.head_dim, self.dtype),
        out_shardings=self.pages_sharding)
    return make()

  def _model(self, params):
    return nnx.merge(self.graphdef, params)

  def _prefill(self, params, tokens, lengths, sampling: SamplingArrays) -> PrefillResult:
    """tokens int32[B, S] right-padded, lengths int32[B] (0 for a padding row)."""
    model = self._model(params)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, kv = model(tokens, positions, PromptAttention(lengths, self.attention_impl, self.mesh))
    last = jnp.maximum(lengths - 1, 0)
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logits = model.logits(hidden_last)
    return PrefillResult(sample(logits, sampling, last), logits, kv)

  def _insert(self, kv_pages, prompt_kv, page_ids):
    """page_ids int32[B, S // page_size]: the page of each prompt block, num_pages to skip it."""
    return [kv_cache.write_prompt(pages, kv, page_ids) for pages, kv in zip(kv_pages, prompt_kv)]

  def _decode(self, params, kv_pages, tokens, positions, page_table, sampling: SamplingArrays):
    """tokens int32[B]: the token at `positions` int32[B] (-1 for an idle row), appended to the
    row's pages and attended; returns the sampled next token of every row."""
    model = self._model(params)
    active = positions >= 0
    context = jnp.maximum(positions, 0)
    attention = PagedAttention(page_table, context, active.astype(jnp.int32), self.page_size,
                               self.attention_impl, self.mesh)
    hidden, kv_pages = model(tokens[:, None], context[:, None], attention, kv_pages)
    logits = model.logits(hidden[:, 0])
    return jnp.where(active, sample(logits, sampling, context), tokens), kv_pages

  def _chunk(self, params, kv_pages, tokens, context_lens, chunk_lens, page_table,
             sampling: SamplingArrays):
    """tokens int32[B, C]: up to C new tokens per row at positions context_lens + [0, C); samples
    after each row's last real token."""
    model = self._model(params)
    c = tokens.shape[1]
    positions = context_lens[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    attention = PagedAttention(page_table, context_lens, chunk_lens, self.page_size,
                               self.attention_impl, self.mesh)
    hidden, kv_pages = model(tokens, positions, attention, kv_pages)
    last = jnp.maximum(chunk_lens - 1, 0)
    hidden_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    logits = model.logits(hidden_last)
    return sample(logits, sampling, context_lens + last), logits, kv_pages

  # ------------------------------------------------------------------ serving-engine variants

  def make_extract(self, plan: TransferPlan):
    """extract(prompt_kv, row): one row of a prefill batch's KV (list[LayerKV [B, S, Hkv, D]]),
    packed into the arrays `plan` moves to the decode mesh."""
    def extract(prompt_kv, row):
      stacked = jnp.stack([jnp.stack([kv.k[row], kv.v[row]]) for kv in prompt_kv])
      return plan.pack(stacked)  # [L, 2, S, Hkv, D] -> the plan's source layout
    return jax.jit(extract, out_shardings=plan.source_shardings)

  def _insert_prefix(self, kv_pages, tokens, prefix_blocks, page_ids, slot, token):
    """Writes one request's KV, as it arrives ([d, L, 2, S, Hkv/d, D], see TransferPlan), into
    its pages (int32[S / ps], num_pages to skip) and sets its slot's next input token."""
    prefix_kv = TransferPlan.unpack(prefix_blocks)
    batched = [kv_cache.LayerKV(layer[0][None], layer[1][None]) for layer in prefix_kv]
    kv_pages = self._insert(kv_pages, batched, page_ids[None])
    return kv_pages, tokens.at[slot].set(token)

  def _mixed(self, params, kv_pages, tokens, positions, page_table, sampling: SamplingArrays,
             chunk_tokens, chunk_slots, chunk_context, chunk_lens, chunk_final):
    """One continuous-batching step: every slot with positions >= 0 decodes one token, and
    chunk_tokens int32[Bc, C] extend the prompts of slots chunk_slots (B for a padding row) at
    positions chunk_context + [0, chunk_lens). A chunk marked final samples its request's first
    token into `tokens`; decode rows sample their next one. Idle slots keep their token."""
    model = self._model(params)
    b, (bc, c) = tokens.shape[0], chunk_tokens.shape
    active = positions >= 0
    context = jnp.maximum(positions, 0)
    safe_slots = jnp.minimum(chunk_slots, b - 1)
    chunk_table = jnp.where((chunk_slots < b)[:, None], page_table[safe_slots], 0)
    attention = MixedAttention(
        decode=PagedAttention(page_table, context, active.astype(jnp.int32), self.page_size,
                              self.attention_impl, self.mesh),
        chunks=PagedAttention(chunk_table, chunk_context, chunk_lens, self.page_size,
                              self.attention_impl, self.mesh),
        num_decode=b)
    chunk_positions = chunk_context[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    flat_tokens = jnp.concatenate([tokens, chunk_tokens.reshape(-1)])
    flat_positions = jnp.concatenate([context, chunk_positions.reshape(-1)])
    hidden, kv_pages = model(flat_tokens, flat_positions, attention, kv_pages)
    decode_next = sample(model.logits(hidden[:b]), sampling, context)
    tokens = jnp.where(active, decode_next, tokens)
    last = jnp.maximum(chunk_lens - 1, 0)
    chunk_hidden = jnp.take_along_axis(hidden[b:].reshape(bc, c, -1), last[:, None, None],
                                       axis=1)[:, 0]
    chunk_sampling = jax.tree.map(lambda x: x[safe_slots], sampling)
    first = sample(model.logits(chunk_hidden), chunk_sampling, chunk_context + last)
    write_to = jnp.where(chunk_final, chunk_slots, b)  # b: dropped
    return tokens.at[write_to].set(first, mode="drop"), kv_pages
