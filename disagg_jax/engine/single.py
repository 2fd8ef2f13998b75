"""The reference generation path: static batches on one mesh, no scheduler.

Prompts are validated, sorted by length and cut into batches of at most `max_batch`; each batch is
prefilled at once, its KV inserted into a page pool, and decoded step by step until every row has
stopped. Every other mode must reproduce its greedy output token for token.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from disagg_jax.engine import buckets, memory
from disagg_jax.engine.request import HostLogprobs, Limits, RequestOutput, stop_ids, validate
from disagg_jax.engine.sampling import (InvalidRequestError, SamplingArrays, SamplingParams,
                                        history_row)
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.kv.pages import pages_for
from disagg_jax.models.loading import Model


@dataclasses.dataclass
class PhaseTimes:
  """Seconds spent prefilling and decoding, compilation excluded (`compile_s`: the steps'
  compilations on first use, whichever phase needed them)."""
  prefill_s: float = 0.0
  decode_s: float = 0.0
  compile_s: float = 0.0
  decode_steps: int = 0
  generated_tokens: int = 0


class StaticGenerator:
  """Generates for a list of prompts with static batching (`--mode=single`)."""

  def __init__(self, model: Model, *, limits: Limits, page_size: int = 16, max_batch: int = 32,
               attention_impl: str = "auto"):
    self.model = model
    self.limits = limits
    self.page_size = page_size
    self.max_batch = max_batch
    self.steps = ModelSteps(model, page_size=page_size, attention_impl=attention_impl)
    self.dp = self.steps.dp
    self.batch_buckets = buckets.batch_buckets(max_batch, self.dp)
    self.pages_per_seq = pages_for(limits.max_seq_len, page_size)
    # Each dp row holds the pages of its own rows of the batch: a scratch page, then a run of
    # pages_per_seq pages per row.
    self.rows_per_shard = self.batch_buckets[-1] // self.dp
    self.pages_per_shard = memory.full_shard_pages(self.rows_per_shard, limits.max_seq_len,
                                                   page_size)
    self.num_pages = self.dp * self.pages_per_shard
    self._kv_pages = None
    self.times = PhaseTimes()

  @property
  def tokenizer(self):
    return self.model.tokenizer

  def shutdown(self) -> None:
    """Nothing runs between calls (`engine.api.Generator`)."""

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams]) -> list[RequestOutput]:
    """One output per prompt, in order; a prompt that fails validation gets finish_reason "error"
    and its message, and the others are generated regardless."""
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    outputs = [RequestOutput(f"req-{i}", list(p)) for i, p in enumerate(prompts)]
    valid = []
    for i, (prompt, params) in enumerate(zip(prompts, sampling)):
      try:
        validate(prompt, params, self.model.cfg, self.limits)
        valid.append(i)
      except InvalidRequestError as e:
        outputs[i].finish_reason, outputs[i].error = "error", str(e)
    # Similar lengths share a batch, which keeps padding (and wasted prefill compute) low.
    valid.sort(key=lambda i: len(prompts[i]))
    for start in range(0, len(valid), self.max_batch):
      rows = valid[start:start + self.max_batch]
      tokens = self._generate_batch([list(prompts[i]) for i in rows], [sampling[i] for i in rows])
      for i, (out_tokens, reason, logprobs) in zip(rows, tokens):
        outputs[i].output_token_ids, outputs[i].finish_reason = out_tokens, reason
        outputs[i].text = self.model.tokenizer.decode(out_tokens)
        outputs[i].logprobs = logprobs if sampling[i].logprobs is not None else None
    return outputs

  def _compile_seconds(self) -> float:
    return sum(step.seconds for step in self.steps.all_steps())

  def _generate_batch(self, prompts: list[list[int]], sampling: list[SamplingParams]):
    cfg, ps = self.model.cfg, self.page_size
    n = len(prompts)
    batch = buckets.pick(n, self.batch_buckets)
    lengths = np.zeros(batch, np.int32)
    lengths[:n] = [len(p) for p in prompts]
    seq_bucket = buckets.pick(int(lengths.max()),
                              buckets.length_buckets(self.limits.max_prefill_length, ps))
    tokens = np.zeros((batch, seq_bucket), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
    sampling_arrays = SamplingArrays.from_params(sampling, batch)

    # Each row gets a contiguous run of pages (of its dp row's block) for its prompt plus
    # everything it may generate.
    totals = [len(p) + s.max_new_tokens for p, s in zip(prompts, sampling)]
    width = buckets.pick(pages_for(max(totals), ps),
                         buckets.width_buckets(self.limits.max_seq_len, ps))
    page_table = np.zeros((batch, width), np.int32)
    per_shard = batch // self.dp
    for i in range(n):
      first = ((i // per_shard) * self.pages_per_shard + memory.SCRATCH_PAGES_PER_SHARD
               + (i % per_shard) * self.pages_per_seq)
      page_table[i] = np.arange(first, first + width)
    insert_ids = np.full((batch, seq_bucket // ps), self.num_pages, np.int32)  # dropped
    for i in range(n):
      used = pages_for(lengths[i], ps)
      insert_ids[i, :used] = page_table[i, :used]

    t0, compiled0 = time.perf_counter(), self._compile_seconds()
    put = self.steps.put_rows
    tokens, lengths_dev, sampling_arrays, page_table_dev, insert_ids = put(
        tokens, lengths, sampling_arrays, page_table, insert_ids)
    all_rows = put(np.arange(batch, dtype=np.int32))[0]
    result = self.steps.prefill(self.model.params, tokens, lengths_dev, sampling_arrays)
    if self._kv_pages is None:
      self._kv_pages = self.steps.init_pages(self.num_pages)
    self._kv_pages = self.steps.insert(self._kv_pages, result.kv, insert_ids)
    next_tokens = np.asarray(result.tokens)
    step_logprobs = HostLogprobs.read(result.logprobs, sampling)
    # Penalty histories: each prompt and its first token (the steps add the later ones).
    history = np.zeros((batch, cfg.vocab_size), np.int32)
    for i in range(n):
      if sampling[i].penalized:
        history[i] = history_row(prompts[i], [int(next_tokens[i])], cfg.vocab_size)
    history = put(history)[0]
    t1, compiled1 = time.perf_counter(), self._compile_seconds()
    self.times.prefill_s += (t1 - t0) - (compiled1 - compiled0)

    outputs: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    stops = [stop_ids(s, cfg) for s in sampling]
    positions = np.full(batch, -1, np.int32)
    for i in range(n):
      positions[i] = lengths[i]
    while True:
      for i in range(n):
        if reasons[i] is not None:
          continue
        token = int(next_tokens[i])
        outputs[i].append(token)
        logprobs[i].append(step_logprobs and step_logprobs.row(i, sampling[i]))
        if token in stops[i]:
          reasons[i] = "stop"
        elif len(outputs[i]) >= sampling[i].max_new_tokens:
          reasons[i] = "length"
        if reasons[i] is not None:
          positions[i] = -1
      if all(r is not None for r in reasons):
        break
      next_dev, self._kv_pages, logprobs_dev, history = self.steps.decode(
          self.model.params, self._kv_pages, *put(next_tokens.astype(np.int32), positions),
          page_table_dev, sampling_arrays, all_rows, history)
      next_tokens = np.asarray(next_dev)
      step_logprobs = HostLogprobs.read(logprobs_dev, sampling)
      positions = np.where(positions >= 0, positions + 1, -1).astype(np.int32)
      self.times.decode_steps += 1
    compiled2 = self._compile_seconds()
    self.times.decode_s += (time.perf_counter() - t1) - (compiled2 - compiled1)
    self.times.compile_s += compiled2 - compiled0
    self.times.generated_tokens += sum(len(o) for o in outputs)
    return list(zip(outputs, reasons, logprobs))
