"""The engine's pure device functions, jit-compiled once per shape bucket.

    prefill(params, tokens, lengths, sampling)                -> (first tokens, logits, prompt KV)
    insert(kv_pages*, prompt_kv, page_ids)                    -> kv_pages
    decode(params, kv_pages*, tokens, positions, page_table, sampling) -> (next tokens, kv_pages)
    chunk(params, kv_pages*, tokens, context_lens, chunk_lens, page_table, sampling)
                                                              -> (next tokens, logits, kv_pages)

(* donated: the page pool is updated in place.) Everything is an explicit pytree: `params` is the
model's `nnx.State`, `kv_pages` a list of `LayerPages`, the prompt KV a list of `LayerKV`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from disagg_jax import parallel
from disagg_jax.engine.attention import PagedAttention, PromptAttention
from disagg_jax.engine.sampling import SamplingArrays, sample
from disagg_jax.kv import cache as kv_cache
from disagg_jax.models.loading import Model


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
    self.prefill = jax.jit(self._prefill, out_shardings=PrefillResult(rep, rep, dense))
    self.insert = jax.jit(self._insert, donate_argnums=(0,), out_shardings=pages)
    self.decode = jax.jit(self._decode, donate_argnums=(1,), out_shardings=(rep, pages))
    self.chunk = jax.jit(self._chunk, donate_argnums=(1,), out_shardings=(rep, rep, pages))

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
    return sample(logits, sampling, context), kv_pages

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
