"""The disaggregated pipeline: prefill on one mesh, decode on another, KV moved in between.

Three threads, joined by queues (JetStream's split, simplified):
  prefill  — batches waiting prompts of one length bucket, runs `prefill` on the prefill mesh,
             emits each first token and cuts each request's KV out of the batch (`extract`);
  transfer — moves each request's KV to the decode mesh, one whole-buffer device-to-device
             copy per decode device (`disagg_jax.transfer.TransferPlan`), and waits for the
             copy, so the decode loop only ever inserts KV that has arrived;
  decode   — inserts arrived requests into free slots (`insert_prefix`, donated page pool) and
             runs continuous-batching decode steps.
KV that is prefilled but not yet in the page pool waits in staging buffers on the decode devices.
A `StagingBudget` of tokens bounds it: prefill reserves a request's length bucket before running
it and the reservation is released when the KV is in the pool (or the request ends), so prefill
backs off instead of filling the decode devices. Preempted requests go back to prefill.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import jax
import numpy as np

from disagg_jax import parallel
from disagg_jax.engine import buckets
from disagg_jax.engine.decode_core import DecodeCore
from disagg_jax.engine.sampling import SamplingArrays
from disagg_jax.engine.state import RequestState
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.engine.worker import Worker
from disagg_jax.kv import cache as kv_cache
from disagg_jax.sched import policy as policy_lib
from disagg_jax.transfer.plan import TransferPlan


class StagingBudget(policy_lib.TokenBudget):
  """Tokens of prefilled KV allowed to wait for a decode slot (`policy.TokenBudget`), shared by
  the engine's threads: the prefill thread may wait for room."""

  def __init__(self, tokens: int):
    super().__init__(tokens)
    self._cv = threading.Condition()
    self.trace = None  # a sched.trace.Trace: releases are recorded

  def reserve(self, request: RequestState, tokens: int) -> bool:
    with self._cv:
      return super().reserve(request, tokens)

  def release(self, request: RequestState) -> None:
    with self._cv:
      if self.trace is not None and request.staged:
        self.trace.add("staging", "release", (request.request_id,))
      super().release(request)
      self._cv.notify_all()

  def held(self) -> threading.Condition:
    """The budget's lock (reentrant), for deciding over several reservations at once."""
    return self._cv

  def wait_for(self, tokens: int, timeout: float) -> bool:
    """Waits up to `timeout` seconds for `tokens` to be free; whether they are."""
    with self._cv:
      return self._cv.wait_for(lambda: self.free >= tokens, timeout)


def releasing(staging: StagingBudget, finish):
  """`finish` that first returns the request's staging reservation: a request holds one from the
  prefill batch that took it until its KV enters the pool (`DisaggDecodeLoop`) or it ends, here."""
  def done(request: RequestState) -> None:
    staging.release(request)
    finish(request)
  return done


class PrefillWorker(Worker):
  """Prefill thread: length-bucketed batches of waiting requests (`queue`) on the prefill mesh.

  A batch holds at most `max_batch` prompts and `max_tokens` padded tokens (one prompt per dp
  row of the prefill mesh at least)."""
  name = "prefill"

  def __init__(self, steps: ModelSteps, params, plan: TransferPlan, *, length_buckets,
               max_batch: int, max_tokens: int, handoff, finish, staging: StagingBudget):
    super().__init__()
    self.steps = steps
    self.params = params
    self.extract = steps.make_extract(plan)
    self.length_buckets = length_buckets
    self.batch_buckets = buckets.batch_buckets(max_batch, steps.dp)
    self.max_tokens = max_tokens
    self.handoff = handoff  # (request, prefix KV, bucket) -> None
    self.finish = releasing(staging, finish)
    self.staging = staging

  def batch_buckets_for(self, length: int) -> tuple[int, ...]:
    """The batch sizes of `length`-token prefill steps within the token limit."""
    fitting = tuple(b for b in self.batch_buckets if b * length <= self.max_tokens)
    return fitting or self.batch_buckets[:1]

  def shapes(self, max_len: int):
    """(description, thunk compiling it) of every prefill shape up to `max_len` tokens."""
    out = []
    for s in [s for s in self.length_buckets if s <= max_len]:
      for b in self.batch_buckets_for(s):
        out.append((f"prefill batch={b} len={s}", lambda b=b, s=s: self._compile(b, s)))
    return out

  def _inputs(self, tokens, lengths, sampling):
    sampling_arrays = SamplingArrays.from_params(sampling, tokens.shape[0])
    return (self.params, *self.steps.put_rows(tokens, lengths, sampling_arrays))

  def prefill_batch(self, tokens: np.ndarray, lengths: np.ndarray, sampling):
    """Runs one prefill step: tokens int32[B, S] (B a batch bucket), lengths int32[B], sampling
    settings of the first rows -> (first tokens int32[B] on the host, the batch's KV)."""
    result = self.steps.prefill(*self._inputs(tokens, lengths, sampling))
    return np.asarray(result.tokens), result.kv

  def _compile(self, batch: int, length: int) -> None:
    cfg, steps = self.steps.cfg, self.steps
    self.steps.prefill.precompile(*self._inputs(np.zeros((batch, length), np.int32),
                                                np.ones(batch, np.int32), []))
    dense = parallel.dense_kv_sharding(cfg, steps.mesh)
    layer = jax.ShapeDtypeStruct((batch, length, cfg.num_kv_heads, cfg.head_dim), steps.dtype,
                                 sharding=dense)
    kv = [kv_cache.LayerKV(layer, layer) for _ in range(cfg.num_layers)]
    self.extract.precompile(kv, np.int32(0))

  def run(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      requests, bucket = batch
      rows = buckets.pick(len(requests), self.batch_buckets_for(bucket))
      tokens = np.zeros((rows, bucket), np.int32)
      lengths = np.zeros(rows, np.int32)
      now = time.perf_counter()
      for i, request in enumerate(requests):
        tokens[i, :len(request.tokens_to_compute)] = request.tokens_to_compute
        lengths[i] = len(request.tokens_to_compute)
        request.metrics.prefill_start = request.metrics.prefill_start or now
      first, kv = self.prefill_batch(tokens, lengths, [r.sampling for r in requests])
      now = time.perf_counter()
      for i, request in enumerate(requests):
        if request.metrics.first_token is None:
          request.metrics.first_token = now
        if request.aborted or request.emit(int(first[i]), now):
          self.finish(request)
        else:
          self.handoff(request, self.extract(kv, np.int32(i)), bucket)

  def _next_batch(self):
    """The policy's next batch (`policy.prefill_batch`); None once stopped."""
    bucket_of = lambda n: buckets.pick(n, self.length_buckets)
    while True:
      with self.cv:
        while not self.stopped and not self.queue:
          self.cv.wait()
        if self.stopped:
          return None
        for request in [r for r in self.queue if r.aborted]:
          self.queue.remove(request)
          self.finish(request)
        if not self.queue:
          continue
        with self.staging.held():  # no release between the reservations and the record
          choice = policy_lib.prefill_batch(
              self.queue, bucket_of=bucket_of,
              max_batch_for=lambda b: self.batch_buckets_for(b)[-1], staging=self.staging)
          if choice is not None and self.trace is not None:
            self.trace.add("prefill", "decide",
                           (tuple(r.request_id for r in choice[0]), choice[1]))
        if choice is not None:
          return choice
        head_bucket = bucket_of(self.queue[0].num_to_compute)
      # The decode side is full: wait for room, re-checking stop and aborts meanwhile.
      self.staging.wait_for(head_bucket, timeout=0.05)


class TransferWorker:
  """Transfer thread: each request's KV to the decode mesh, one device-to-device copy per decode
  device (see TransferPlan)."""

  def __init__(self, plan: TransferPlan, deliver, finish, staging: StagingBudget):
    self.plan = plan
    self.deliver = deliver
    self.finish = releasing(staging, finish)
    self.staging = staging
    self.queue: queue.Queue = queue.Queue()

  def submit(self, request: RequestState, prefix: Any, bucket: int) -> None:
    self.queue.put((request, prefix, bucket))

  def wake(self) -> None:
    """Nothing to do: aborted requests are dropped when they reach the front of the queue."""

  def stop(self) -> None:
    self.queue.put(None)

  def run(self) -> None:
    while True:
      item = self.queue.get()
      if item is None:
        return
      request, prefix, bucket = item
      if request.aborted:
        self.finish(request)
        continue
      request.metrics.transfer_start = time.perf_counter()
      moved = jax.block_until_ready(self.plan.transfer(prefix))
      request.metrics.transfer_end = time.perf_counter()
      self.deliver(request, moved, bucket)


class DisaggDecodeLoop(Worker):
  """Decode thread: inserts arrived requests (`queue`: (request, KV, bucket)) and runs
  continuous-batching decode steps."""

  def __init__(self, core: DecodeCore, *, length_buckets, finish, requeue,
               staging: StagingBudget):
    super().__init__()
    self.core = core
    self.length_buckets = length_buckets
    self.finish = releasing(staging, finish)
    self.requeue = requeue  # a preempted request goes back to prefill
    self.staging = staging
    self.trace = None  # a sched.trace.Trace: arrivals and decisions are recorded

  def deliver(self, request: RequestState, prefix: Any, bucket: int) -> None:
    with self.cv:
      if self.trace is not None:
        self.trace.add("decode", "arrive", (request.request_id,))
      self.queue.append((request, prefix, bucket))
      self.cv.notify()

  def shapes(self, max_len: int, prefix_spec):
    """(description, thunk compiling it) of the decode widths and insert buckets up to `max_len`
    tokens; prefix_spec(bucket) is a ShapeDtypeStruct of a bucket's KV as it arrives."""
    ps = self.core.steps.page_size
    out = [(f"decode rows={r} width={w}", lambda w=w, r=r: self.core.precompile_decode(w, r))
           for w in self.core.widths if w * ps <= max(max_len, self.core.widths[0] * ps)
           for r in self.core.row_buckets]
    out += [(f"insert len={s}", lambda s=s: self.insert_discarded(prefix_spec(s), s,
                                                                  precompile=True))
            for s in self.length_buckets if s <= max_len]
    return out

  def run(self) -> None:
    """One step ahead: step N+1 is dispatched before step N's tokens are read, so the device
    never waits for the host's bookkeeping."""
    core = self.core
    in_flight = None
    while True:
      with self.cv:
        while (not self.stopped and not self.queue and not core.slots.occupied()
               and in_flight is None):
          self.cv.wait()
        if self.stopped:
          return
      self._drop_aborted()
      dispatched = self.step()
      if in_flight is not None:
        core.collect(in_flight, self.finish)
      elif dispatched is None and self.queue:
        time.sleep(0.001)  # cannot insert with every page free; never spin on it regardless
      in_flight = dispatched

  def step(self):
    """Inserts what arrived and fits (`policy.insert_arrived`), grows the batch by a token
    (preempting as `policy.decode_step`) and dispatches the decode step; its handle, or None."""
    core = self.core
    with self.cv:
      inserted = policy_lib.insert_arrived(core.slots, self.queue, lambda item: item[0])
      decoding, preempted = policy_lib.decode_step(core.slots)
      if self.trace is not None:
        self.trace.add("decode", "decide",
                       policy_lib.describe_decode(core.slots, inserted, decoding, preempted))
    for (request, prefix, bucket), slot in inserted:
      if core.slots.requests[slot] is request:  # not preempted by this very step
        self._insert(request, prefix, bucket, slot)
      self.staging.release(request)
    for request in preempted:
      request.restart()
      self.requeue(request)
    return core.decode(decoding) if decoding else None

  def _drop_aborted(self) -> None:
    with self.cv:
      aborted = [item for item in self.queue if item[0].aborted]
      for item in aborted:
        self.queue.remove(item)
    for request, _, _ in aborted:
      self.finish(request)
    for slot in self.core.slots.occupied():
      if self.core.slots.requests[slot].aborted:
        self.finish(self.core.release(slot))

  def insert_discarded(self, prefix, bucket: int, precompile: bool = False) -> None:
    """Runs (or with `precompile` only compiles) the insert step for a `bucket`-token prefix
    whose writes are all dropped: for compiling ahead and for timing it."""
    core = self.core
    core.insert(prefix, np.full(bucket // core.steps.page_size, core.slots.num_pages, np.int32),
                core.slots.num_slots, 0, precompile=precompile)

  def _insert(self, request: RequestState, prefix, bucket: int, slot: int) -> None:
    """Writes `request`'s arrived KV into its slot's pages."""
    core = self.core
    core.insert(prefix, core.slots.prompt_page_ids(slot, request.num_to_compute, bucket), slot,
                request.output_ids[-1])
