"""The engine's pure device functions, jit-compiled once per shape bucket.

    prefill(params, tokens, lengths, sampling)    -> (first tokens, logits, prompt KV, logprobs)
    insert(kv_pages*, prompt_kv, page_ids)                    -> kv_pages
    decode(params, kv_pages*, tokens, positions, page_table, sampling, rows, history*)
                                                     -> (tokens, kv_pages, logprobs, history)
  The serving engine's variants keep each slot's next input token on device:
    prefill_groups(groups)[g](params, tokens | (hidden, tokens), lengths, sampling)
                                       -> (hidden, layer group g's KV); the last: like prefill
    make_extract(plan)(prompt_kv, row, num_pages)             -> one request's KV as page blocks
    make_gather(plan)(layer_pages, page_ids, num_pages)       -> the same, read from the pool
    insert_block(layer_pages*, block, page_ids)               -> layer_pages
    set_token(tokens, slot, token)                            -> tokens
    mixed(params, kv_pages*, tokens, positions, page_table, sampling, chunk..., history*)
                                                     -> (tokens, kv_pages, logprobs, history)
    set_history(history*, slot, row)                          -> history

(* donated: the page pool is updated in place.) Everything is an explicit pytree: `params` is the
model's `nnx.State`, `kv_pages` a list of `LayerPages`, the prompt KV a list of `LayerKV`.
Per-row arrays (tokens, positions, page tables, sampling settings) split over the mesh's dp axis
with the page pool (`disagg_jax.kv.layout`); page tables are [B, W] with W a width bucket covering
the step's longest sequence, so short contexts never pay for max_seq_len. `logprobs` is a
`LogprobArrays` over the same rows as the tokens beside it: the log-probabilities of each row's
token and its most likely alternatives, from the logits the token was sampled from (zeros unless
a row's sampling settings ask for them). `history` int32[B, V] is each slot's penalty history
(`sampling.history_row`), updated with the tokens the step samples; None (the default) when the
caller applies no penalties.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from disagg_jax import parallel
from disagg_jax.engine.compiled import Step
from disagg_jax.engine.attention import (MixedAttention, PagedAttention, PromptAttention,
                                         rows_constraint)
from disagg_jax.engine.sampling import (LogprobArrays, SamplingArrays, prompt_history,
                                        record_tokens, sample_with_logprobs)
from disagg_jax.kv import cache as kv_cache
from disagg_jax.kv import layout as kv_layout
from disagg_jax.models.loading import Model
from disagg_jax.transfer import pieces
from disagg_jax.transfer.plan import TransferPlan


class PrefillResult(NamedTuple):
  tokens: jax.Array  # int32[B], the first generated token of each prompt
  logits: jax.Array  # float32[B, V], at each prompt's last position
  kv: list  # list[LayerKV], each [B, S, Hkv, D]
  logprobs: LogprobArrays  # of each first token (sampling.LogprobArrays)


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
                                           out_shardings=PrefillResult(rows, rows, dense,
                                                                        rows)))
    self.insert = Step("insert", jax.jit(self._insert, donate_argnums=(0,), out_shardings=pages))
    self.decode = Step("decode", jax.jit(self._decode, donate_argnums=(1, 7),
                                         out_shardings=(rows, pages, rows, rows)))
    # Only the page pool is donated: the engine keeps reading a step's token array after
    # dispatching the next step (it is tiny anyway).
    self.insert_block = Step("insert_block", jax.jit(self._insert_block, donate_argnums=(0,),
                                                     out_shardings=pages))
    self.set_token = Step("set_token", jax.jit(lambda tokens, slot, token:
                                               tokens.at[slot].set(token), out_shardings=rows))
    self._groups: dict[tuple, list[Step]] = {}
    self.mixed = Step("mixed", jax.jit(self._mixed, donate_argnums=(1, 11),
                                       out_shardings=(rows, pages, rows, rows)))
    self.set_history = Step("set_history", jax.jit(
        lambda history, slot, row: history.at[slot].set(row), donate_argnums=(0,),
        out_shardings=rows))

  def all_steps(self) -> list[Step]:
    group_steps = [step for steps in self._groups.values() for step in steps]
    return [self.prefill, self.insert, self.decode, self.insert_block, self.set_token,
            self.mixed, self.set_history, *group_steps]

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
    history = prompt_history(tokens, lengths, sampling, logits.shape[-1])
    first, logprobs = sample_with_logprobs(logits, sampling, last, history)
    return PrefillResult(first, logits, kv, logprobs)

  def prefill_groups(self, groups: tuple[tuple[int, int], ...]) -> list[Step]:
    """The prefill step as one step per layer group ([start, stop) each, in order): the first
    takes the tokens, each passes (its hidden states, the tokens) on, and every one returns its
    layers' KV ([B, S, Hkv, D] per layer); the last returns a PrefillResult (the tokens make
    its penalty history). One group is `prefill`."""
    if len(groups) == 1:
      return [self.prefill]
    if groups not in self._groups:
      rows = parallel.batch_sharding(self.mesh)
      dense = parallel.dense_kv_sharding(self.cfg, self.mesh)
      steps = []
      for g, (start, stop) in enumerate(groups):
        last = g == len(groups) - 1
        fn = functools.partial(self._prefill_group, start=start, stop=stop, first=g == 0,
                               last=last)
        out = PrefillResult(rows, rows, dense, rows) if last else ((rows, rows), dense)
        steps.append(Step(f"prefill layers {start}-{stop - 1}",
                          jax.jit(fn, out_shardings=out)))
      self._groups[groups] = steps
    return self._groups[groups]

  def _prefill_group(self, params, inputs, lengths, sampling: SamplingArrays, *, start: int,
                     stop: int, first: bool, last: bool):
    """Layers [start, stop) of the prefill step. inputs: int32[B, S] tokens (first group) or
    (the previous group's hidden states [B, S, H], the tokens)."""
    model = self._model(params)
    if first:
      tokens = inputs
      inputs = model.embed(rows_constraint(inputs, self.layout))
    else:
      inputs, tokens = inputs
    b, s = inputs.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    attention = PromptAttention(lengths, self.attention_impl, self.layout)
    hidden, kv = model.run_layers(inputs, positions, attention, start, stop)
    if not last:
      return (hidden, tokens), kv
    hidden = model.final_norm(hidden)
    index = jnp.maximum(lengths - 1, 0)
    hidden_last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    logits = model.logits(hidden_last)
    history = prompt_history(tokens, lengths, sampling, logits.shape[-1])
    first_tokens, logprobs = sample_with_logprobs(logits, sampling, index, history)
    return PrefillResult(first_tokens, logits, kv, logprobs)

  def _insert(self, kv_pages, prompt_kv, page_ids):
    """prompt_kv [B, S, Hkv, D] per layer, rows over dp; page_ids int32[B, S // page_size]: the
    page of each prompt block (from the row's dp block), num_pages to skip it."""
    return self.layout.write_prompts(kv_pages, prompt_kv, page_ids)

  def _decode(self, params, kv_pages, tokens, positions, page_table, sampling: SamplingArrays,
              rows, history=None):
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
    sampled, logprobs = sample_with_logprobs(logits, jax.tree.map(gather, sampling), context,
                                             history, rows)
    return (tokens.at[rows].set(jnp.where(active, sampled, current)), kv_pages,
            LogprobArrays.zeros(tokens.shape[0]).at_set(rows, logprobs),
            record_tokens(history, rows, sampled, active))

  # ------------------------------------------------------------------ serving-engine variants

  def make_extract(self, plan: TransferPlan):
    """extract(prompt_kv, row, num_pages): one row of a prefill batch's KV (list[LayerKV
    [B, S, Hkv, D]], any group of layers) as page blocks, each packed into the arrays `plan`
    moves to the decode mesh: block k holds 2^k pages starting where the set bits of num_pages
    above k end (`transfer.pieces.page_blocks`), so the blocks of num_pages's set bits are
    exactly its first num_pages pages. One compiled program per batch shape, whatever
    num_pages (int32, traced)."""

    def extract(prompt_kv, row, num_pages):
      stacked = jnp.stack([jnp.stack([kv.k[row], kv.v[row]]) for kv in prompt_kv])
      return self._page_blocks(plan, stacked, num_pages)
    return Step("extract", jax.jit(extract))

  def make_gather(self, plan: TransferPlan):
    """gather(layer_pages, page_ids, num_pages): one request's KV read from the page pool (a
    group of layers' `LayerPages`) at its pages page_ids int32[P] (global ids, all in one dp
    row's block; padded with ids past the pool) as the page blocks `make_extract` cuts, for the
    same plan. The prefill side's cache (`engine.prefill_cache`) hands KV on this way. One
    compiled program per P, whatever num_pages."""
    ps, layout = self.page_size, self.layout
    repeat = layout.pool_heads // layout.num_kv_heads

    def local(layer_pages, page_ids):
      num_local = layer_pages[0].k.shape[1]
      ids = kv_cache.localize(page_ids, num_local, layout.page_offset(num_local))
      take = lambda x: x.at[:, ids].get(mode="fill", fill_value=0)  # [H, P, ps, D]
      return jnp.stack([jnp.stack([take(p.k), take(p.v)]) for p in layer_pages])[None]

    def gather(layer_pages, page_ids, num_pages):
      spec = jax.sharding.PartitionSpec(parallel.DP, None, None, parallel.TP)
      # Each dp row reads its own block (zeros elsewhere); the sum keeps the request's row.
      stacked = layout.run(local, (parallel.POOL_SPEC, jax.sharding.PartitionSpec()), spec,
                           layer_pages, page_ids).sum(0)  # [L, 2, pool heads, P, ps, D]
      stacked = stacked[:, :, ::repeat]
      n, two, h, p, _, d = stacked.shape
      stacked = jnp.moveaxis(stacked, 2, 4).reshape(n, two, p * ps, h, d)
      return self._page_blocks(plan, stacked, num_pages)
    return Step("gather", jax.jit(gather))

  def _page_blocks(self, plan: TransferPlan, stacked, num_pages):
    """[L, 2, S, Hkv, D] (S whole pages) -> the page blocks of its first num_pages pages,
    packed as `plan` moves them: block k holds 2^k pages starting where the set bits of
    num_pages above k end (`transfer.pieces.page_blocks`)."""
    ps = self.page_size
    blocks = []
    for size in pieces.block_sizes(stacked.shape[2] // ps):
      k = size.bit_length() - 1
      first = (num_pages >> (k + 1)) << (k + 1)
      block = jax.lax.dynamic_slice_in_dim(stacked, first * ps, size * ps, axis=2)
      blocks.append(plan.pack(block))  # [L, 2, T, Hkv, D] -> the plan's source layout
    return blocks

  def _insert_block(self, layer_pages, block, page_ids):
    """Writes a page block of one request's KV, as it arrives ([d, Lg, 2, T, Hkv/d, D], see
    TransferPlan; the same on every dp row), into the pages `layer_pages` (the Lg layers it
    covers) at page_ids int32[T / ps] (all from the dp block of the request's slot)."""
    prefix_kv = TransferPlan.unpack(block)
    batched = [kv_cache.LayerKV(layer[0][None], layer[1][None]) for layer in prefix_kv]
    return self.layout.write_prompts(layer_pages, batched, page_ids[None], rows_sharded=False)

  def _mixed(self, params, kv_pages, tokens, positions, page_table, sampling: SamplingArrays,
             chunk_tokens, chunk_slots, chunk_context, chunk_lens, chunk_final, history=None):
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
    sampled, logprobs = sample_with_logprobs(model.logits(rows), row_sampling,
                                             jnp.concatenate([context, chunk_context + last]),
                                             history, jnp.concatenate([jnp.arange(b), safe_slots]))
    tokens = jnp.where(active, sampled[:b], tokens)
    first = sampled[b:]
    write_to = jnp.where(chunk_final, chunk_slots, b)  # b: dropped
    decode_lp = jax.tree.map(lambda x: x[:b], logprobs)
    chunk_lp = jax.tree.map(lambda x: x[b:], logprobs)
    history = record_tokens(history, jnp.arange(b), sampled[:b], active)
    history = record_tokens(history, write_to, first, chunk_final)
    return (tokens.at[write_to].set(first, mode="drop"), kv_pages,
            decode_lp.at_set(write_to, chunk_lp, mode="drop"), history)
