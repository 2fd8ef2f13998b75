"""Prefix caching on the prefill side: prompts computed into a page pool of the prefill mesh.

`CachedPrefillWorker` stands in for `engine.disagg.PrefillWorker` (the same queue, hand-off and
staging contract) when the prefill mesh keeps a cache (`--config.engine.prefill_cache_tokens`):
instead of one dense step per batch of prompts, each prompt is admitted to a slot of a page
pool on the prefill mesh by the colocated policy (`sched.policy.ColocatedPolicy`: the shard
holding the longest cached prefix, shared pages, chunks of at most `chunk_size` tokens) and
only its uncached tail is computed, in the colocated engine's mixed step
(`engine.colocated.ChunkedPrefill`) with no decode rows. Once its last chunk has produced the
first token, the request's pages are read out of the pool as the same page blocks the dense
path cuts (`ModelSteps.make_gather`), handed to the transfer, and its slot is released: its full
pages stay cached (parked, evicted LRU when the pool needs them) for the next prompt sharing
them. docs/PREFIX_CACHING.md compares it with the decode side's cache.
"""

from __future__ import annotations

import collections
import time

import numpy as np

from disagg_jax.engine import buckets, memory
from disagg_jax.engine.colocated import ChunkedPrefill
from disagg_jax.engine.decode_core import DecodeCore
from disagg_jax.engine.request import HostLogprobs
from disagg_jax.engine.disagg import PrefillWorker, StagingBudget, releasing
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.engine.worker import Worker
from disagg_jax.kv.pages import pages_for
from disagg_jax.kv.prefix_cache import cache_salt
from disagg_jax.sched import policy as policy_lib
from disagg_jax.transfer import pieces as pieces_lib
from disagg_jax.transfer.plan import TransferPlan


class CachedPrefillWorker(Worker):
  """Prefill thread over a caching page pool of `pages_per_shard` pages per dp row and
  `num_slots` prompts in flight. `handoff(request, pieces, bucket)`, `discard`, `finish` and
  `staging` as `PrefillWorker` takes them: a request reserves its length bucket of staging
  before it takes a slot and hands its KV on layer group by layer group, the last with its
  bucket."""
  name = "prefill"

  def __init__(self, steps: ModelSteps, params, plan: TransferPlan, *, length_buckets,
               num_slots: int, pages_per_shard: int, max_seq_len: int, chunk_size: int,
               handoff, finish, staging: StagingBudget, discard=None,
               layers_per_group: int | None = None, salt: bytes = b""):
    super().__init__()
    self.steps = steps
    self.core = DecodeCore(steps, num_slots=num_slots, pages_per_shard=pages_per_shard,
                           max_seq_len=max_seq_len, prefix_caching=True, salt=salt)
    self.core.params = params
    self.chunks = ChunkedPrefill(self.core, chunk_size=chunk_size, chunk_batch=num_slots)
    self.policy = self.chunks.policy
    self.gather = steps.make_gather(plan)
    self.extract = self.gather  # what the engine lists among its compiled steps
    self.groups = pieces_lib.layer_groups(steps.cfg.num_layers,
                                          layers_per_group or steps.cfg.num_layers)
    self.length_buckets = length_buckets
    self.handoff = handoff  # (request, pieces, bucket | None) -> None
    self.discard = discard or (lambda request: None)
    self.finish = releasing(staging, finish)
    self.staging = staging
    # Requests holding their staging reservation, waiting for a slot (the policy admits from
    # its head; preempted requests go back to it).
    self.admitting: collections.deque = collections.deque()

  @property
  def slots(self):
    return self.core.slots

  def waiting(self) -> int:
    """Requests not yet in a slot."""
    with self.cv:
      return len(self.queue) + len(self.admitting)

  def pending(self) -> list:
    """The requests here, waiting or computing (a snapshot)."""
    with self.cv:
      return (list(self.queue) + list(self.admitting)
              + [r for r in self.core.slots.requests if r is not None])

  def shapes(self, max_len: int):
    """(description, thunk compiling it) of the mixed-step shapes and the gathers of requests
    up to `max_len` tokens."""
    ps = self.steps.page_size
    out = self.chunks.shapes(max(max_len // ps, self.core.widths[0]))
    for bucket in [s for s in self.length_buckets if s <= max_len]:
      for size in sorted({b - a for a, b in self.groups}):
        out.append((f"gather layers={size} len={bucket}",
                    lambda size=size, bucket=bucket: self.gather.precompile(
                        self.core.kv_pages[:size], np.zeros(bucket // ps, np.int32),
                        np.int32(1))))
    return out + [self.core.history_shape()]

  # ------------------------------------------------------------------ the thread

  def run(self) -> None:
    core = self.core
    while True:
      with self.cv:
        while (not self.stopped and not self.queue and not self.admitting
               and not core.slots.occupied()):
          self.cv.wait()
        if self.stopped:
          return
        aborted = self._take_aborted()
        self._reserve()
        step = self.policy.schedule(core.slots, self.admitting)
        if self.trace is not None:
          self.trace.add("prefill", "decide", step.describe(core.slots))
        blocked = (self._bucket(self.queue[0].num_to_compute)
                   if not step.runs and self.queue and not self.admitting else None)
      for request in aborted:
        self.finish(request)
      if not step.chunks:
        if blocked is not None:  # the decode side is full: wait for staging room
          self.staging.wait_for(blocked, timeout=0.05)
        elif not step.runs and (self.admitting or core.slots.occupied()):
          time.sleep(0.001)  # nothing fits yet; never spin on it
        continue
      start = time.perf_counter()
      self.chunks.dispatch(step.chunks)
      rows = self.policy.commit(core.slots, step)
      if rows:
        tokens = np.asarray(core.tokens)
        logprobs = HostLogprobs.read(core.logprobs, [r.sampling for _, r in rows])
        now = time.perf_counter()
        for slot, request in rows:
          self._hand_on(slot, request, int(tokens[slot]), now,
                        logprobs and logprobs.row(slot, request.sampling))
      # Steps that hand nothing on are not waited for: the next one that does absorbs their time.
      self.record_work(sum(n for _, _, n in step.chunks), time.perf_counter() - start)

  def _bucket(self, num_tokens: int) -> int:
    return buckets.pick(num_tokens, self.length_buckets)

  def _reserve(self) -> None:
    """Moves waiting requests, oldest first, to `admitting` while their length bucket of
    staging can be reserved (lock held)."""
    while self.queue and self.staging.reserve(self.queue[0],
                                              self._bucket(self.queue[0].num_to_compute)):
      self.admitting.append(self.queue.popleft())

  def _take_aborted(self) -> list:
    """Aborted requests out of the queues and slots (lock held); the caller finishes them."""
    out = []
    for waiting in (self.queue, self.admitting):
      for request in [r for r in waiting if r.aborted]:
        waiting.remove(request)
        out.append(request)
    for slot in self.core.slots.occupied():
      if self.core.slots.requests[slot].aborted:
        self.policy.forget(slot)
        out.append(self.core.release(slot))
    return out

  def _hand_on(self, slot: int, request, token: int, now: float, logprob=None) -> None:
    """The request's prompt is in the pool and `token` is its first output: its KV goes to the
    transfer layer group by layer group, then it leaves its slot (its pages stay cached)."""
    core, ps = self.core, self.steps.page_size
    if request.metrics.first_token is None:
      request.metrics.first_token = now
    num_tokens = request.num_to_compute
    if request.aborted or request.emit(token, now, logprob):
      with self.cv:
        core.release(slot)
      self.discard(request)
      self.finish(request)
      return
    bucket = self._bucket(num_tokens)
    num_pages = pages_for(num_tokens, ps)
    page_ids = np.full(bucket // ps, core.slots.num_pages, np.int32)
    page_ids[:num_pages] = core.slots.pages[slot][:num_pages]
    last = len(self.groups) - 1
    for g, (start, stop) in enumerate(self.groups):
      blocks = self.gather(core.kv_pages[start:stop], page_ids, np.int32(num_pages))
      self.handoff(request, pieces_lib.cut(blocks, (start, stop), g, num_pages),
                   bucket if g == last else None)
    with self.cv:
      core.release(slot)


# ---------------------------------------------------------------------- sizing and choosing

def decode_prefill_tokens(config, decode_mesh) -> int:
  """--config.engine.decode_prefill_tokens resolved for a decode mesh (`config` an
  EngineConfig): 0 without prefix caching; -1: chunk_size on TPU/GPU, 0 on CPU, where XLA's
  chunked step on the decode mesh measured worse than the prefill it saves
  (docs/PREFIX_CACHING.md)."""
  n = memory.cache_knob(config, "decode_prefill_tokens")
  if n is None:
    return 0 if next(iter(decode_mesh.devices.flat)).platform == "cpu" else config.chunk_size
  return n


def prefill_cache_shard_pages(tokens: int, page_size: int, dp: int, max_seq_len: int) -> int:
  """Pages per dp row of the prefill mesh's cache of `tokens` tokens, its scratch page included;
  each row must hold one sequence of max_seq_len tokens."""
  per_shard = pages_for(tokens, page_size * dp) + memory.SCRATCH_PAGES_PER_SHARD
  need = pages_for(max_seq_len, page_size) + memory.SCRATCH_PAGES_PER_SHARD
  if per_shard < need:
    raise ValueError(
        f"--config.engine.prefill_cache_tokens={tokens} gives each of the prefill mesh's "
        f"{dp} dp row(s) {per_shard - 1} pages of {page_size} tokens; one sequence of "
        f"max_seq_len={max_seq_len} needs {need - 1}: raise it, or 0 turns the cache off")
  return per_shard


def make_prefill_worker(config, limits, steps: ModelSteps, params, plan: TransferPlan, *,
                        handoff, finish, staging: StagingBudget, discard=None,
                        layers_per_group: int | None = None, say=None):
  """The prefill thread `config` asks for (an EngineConfig): `CachedPrefillWorker` when the
  prefill mesh caches (`prefill_cache_tokens`), else the dense `PrefillWorker`."""
  ps = config.page_size
  length_buckets = buckets.length_buckets(limits.max_seq_len, ps)
  tokens = memory.prefill_cache_tokens(config, limits.max_seq_len, steps.dp)
  if tokens == 0:
    return PrefillWorker(steps, params, plan, length_buckets=length_buckets,
                         max_batch=config.prefill_batch, max_tokens=config.max_prefill_tokens,
                         handoff=handoff, discard=discard, finish=finish, staging=staging,
                         layers_per_group=layers_per_group)
  # Prompts in flight: prefill_batch, at least one per dp row (as the dense batches have).
  num_slots = pages_for(config.prefill_batch, steps.dp) * steps.dp
  per_shard = prefill_cache_shard_pages(tokens, ps, steps.dp, limits.max_seq_len)
  if say is not None:
    say(f"  prefill cache: {(per_shard - 1) * steps.dp:,} pages x {ps} tokens, "
        f"{num_slots} prompts in flight, chunks of {config.chunk_size} tokens")
  return CachedPrefillWorker(
      steps, params, plan, length_buckets=length_buckets, num_slots=num_slots,
      pages_per_shard=per_shard, max_seq_len=limits.max_seq_len, chunk_size=config.chunk_size,
      handoff=handoff, finish=finish, staging=staging, discard=discard,
      layers_per_group=layers_per_group, salt=cache_salt(steps.cfg))
