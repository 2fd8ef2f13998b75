"""The disaggregated pipeline: prefill on one mesh, decode on another, KV moved in between.

Three threads, joined by queues (JetStream's split, simplified):
  prefill  — batches waiting prompts of one length bucket, runs `prefill` on the prefill mesh,
             emits each first token and cuts each request's KV out of the batch (`extract`);
  transfer — moves each request's KV to the decode mesh, one whole-buffer device-to-device
             copy per decode device (`disagg_jax.transfer.TransferPlan`), and waits for the
             copy, so the decode loop only ever inserts KV that has arrived;
  decode   — inserts arrived requests into free slots (`insert_prefix`, donated page pool) and
             runs continuous-batching decode steps.
At most `max_pending` prefilled requests wait for a decode slot (their KV holds decode memory), so
prefill backs off instead of filling the decode mesh. Preempted requests go back to prefill.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import jax
import numpy as np

from disagg_jax.engine import buckets
from disagg_jax.engine.decode_core import DecodeCore
from disagg_jax.engine.sampling import SamplingArrays
from disagg_jax.engine.state import RequestState
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.engine.worker import Worker
from disagg_jax.transfer.plan import TransferPlan


class PrefillWorker(Worker):
  """Prefill thread: length-bucketed batches of waiting requests (`queue`) on the prefill mesh."""

  def __init__(self, steps: ModelSteps, params, plan: TransferPlan, *, length_buckets,
               max_batch: int, handoff, finish, backlog):
    super().__init__()
    self.steps = steps
    self.params = params
    self.extract = steps.make_extract(plan)
    self.length_buckets = length_buckets
    self.batch_buckets = buckets.batch_buckets(max_batch)
    self.handoff = handoff  # (request, prefix KV, bucket) -> None
    self.finish = finish
    self.backlog = backlog  # a threading.Semaphore: slots for prefilled requests not yet decoding

  def warmup_steps(self):
    def run(b, s):
      _, kv = self._prefill(np.zeros((b, s), np.int32), np.ones(b, np.int32), [None] * b)
      self.extract(kv, np.int32(0))
    return [(f"prefill batch={b} len={s}", lambda b=b, s=s: run(b, s))
            for s in self.length_buckets for b in self.batch_buckets]

  def run(self) -> None:
    while True:
      batch = self._next_batch()
      if batch is None:
        return
      requests, bucket = batch
      tokens = np.zeros((buckets.pick(len(requests), self.batch_buckets), bucket), np.int32)
      lengths = np.zeros(tokens.shape[0], np.int32)
      now = time.perf_counter()
      for i, request in enumerate(requests):
        tokens[i, :len(request.tokens_to_compute)] = request.tokens_to_compute
        lengths[i] = len(request.tokens_to_compute)
        request.metrics.prefill_start = request.metrics.prefill_start or now
      first, kv = self._prefill(tokens, lengths, [r.sampling for r in requests])
      now = time.perf_counter()
      for i, request in enumerate(requests):
        if request.metrics.first_token is None:
          request.metrics.first_token = now
        if request.aborted or request.emit(int(first[i]), now):
          self.backlog.release()
          self.finish(request)
        else:
          self.handoff(request, self.extract(kv, np.int32(i)), bucket)

  def _prefill(self, tokens, lengths, sampling):
    sampling_arrays = SamplingArrays.from_params(sampling, tokens.shape[0])
    result = self.steps.prefill(self.params, tokens, lengths, sampling_arrays)
    return np.asarray(result.tokens), result.kv

  def _next_batch(self):
    """The oldest waiting request plus others of its length bucket, as far as the backlog of
    prefilled-but-not-decoding requests allows; None once stopped."""
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
      if not self.backlog.acquire(timeout=0.05):
        continue  # the decode side is full: re-check stop and aborts, then wait again
      with self.cv:
        if not self.queue:
          self.backlog.release()
          continue
        head = self.queue[0]
        bucket = buckets.pick(len(head.tokens_to_compute), self.length_buckets)
        chosen = [head]
        for request in list(self.queue)[1:]:
          if len(chosen) == self.batch_buckets[-1]:
            break
          if (buckets.pick(len(request.tokens_to_compute), self.length_buckets) == bucket
              and not request.aborted and self.backlog.acquire(blocking=False)):
            chosen.append(request)
        for request in chosen:
          self.queue.remove(request)
        return chosen, bucket


class TransferWorker:
  """Transfer thread: each request's KV to the decode mesh, one device-to-device copy per decode
  device (see TransferPlan)."""

  def __init__(self, plan: TransferPlan, deliver, finish, backlog):
    self.plan = plan
    self.deliver = deliver
    self.finish = finish
    self.backlog = backlog
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
        self.backlog.release()
        self.finish(request)
        continue
      request.metrics.transfer_start = time.perf_counter()
      moved = jax.block_until_ready(self.plan.transfer(prefix))
      request.metrics.transfer_end = time.perf_counter()
      self.deliver(request, moved, bucket)


class DisaggDecodeLoop(Worker):
  """Decode thread: inserts arrived requests (`queue`: (request, KV, bucket)) and runs
  continuous-batching decode steps."""

  def __init__(self, core: DecodeCore, *, length_buckets, finish, requeue, backlog):
    super().__init__()
    self.core = core
    self.length_buckets = length_buckets
    self.finish = finish
    self.requeue = requeue  # a preempted request goes back to prefill
    self.backlog = backlog

  def deliver(self, request: RequestState, prefix: Any, bucket: int) -> None:
    self.put((request, prefix, bucket))

  def warmup_steps(self, prefix_for_bucket):
    out = [("decode", lambda: self.core.decode([]))]
    for s in self.length_buckets:
      out.append((f"insert len={s}", lambda s=s: self._insert_dummy(prefix_for_bucket(s), s)))
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
      self._insert_arrived()
      decoding = core.decoding_slots()
      core.make_room({s: int(core.slots.positions[s]) + 1 for s in decoding}, self._preempt)
      decoding = [s for s in decoding if core.slots.requests[s] is not None]
      dispatched = core.decode(decoding) if decoding else None
      if in_flight is not None:
        core.collect(in_flight, self.finish)
      elif dispatched is None and self.queue:
        time.sleep(0.001)  # cannot insert with every page free; never spin on it regardless
      in_flight = dispatched

  def _drop_aborted(self) -> None:
    with self.cv:
      aborted = [item for item in self.queue if item[0].aborted]
      for item in aborted:
        self.queue.remove(item)
    for request, _, _ in aborted:
      self.backlog.release()
      self.finish(request)
    for slot in self.core.slots.occupied():
      if self.core.slots.requests[slot].aborted:
        self.finish(self.core.release(slot))

  def _insert_arrived(self) -> None:
    core = self.core
    while True:
      with self.cv:
        if not self.queue:
          return
        request, prefix, bucket = self.queue[0]
        computed = len(request.tokens_to_compute)
        # Pages for the prefix and the position of the first decoded token, with one page per
        # decoding slot kept back so that insertions do not force preemptions next step.
        if not core.slots.can_admit(computed + 1, reserve=len(core.decoding_slots())):
          return
        self.queue.popleft()
      self.backlog.release()
      slot = core.occupy(request, computed + 1)
      page_ids = core.slots.prompt_page_ids(slot, computed, bucket)
      core.kv_pages, core.tokens = core.steps.insert_prefix(
          core.kv_pages, core.tokens, prefix, page_ids, np.int32(slot),
          np.int32(request.output_ids[-1]))
      core.slots.positions[slot] = request.total_len - 1

  def _insert_dummy(self, prefix, bucket: int) -> None:
    core = self.core
    page_ids = np.full(bucket // core.steps.page_size, core.slots.allocator.num_pages, np.int32)
    core.kv_pages, core.tokens = core.steps.insert_prefix(
        core.kv_pages, core.tokens, prefix, page_ids, np.int32(core.slots.num_slots),
        np.int32(0))

  def _preempt(self, request: RequestState) -> None:
    request.restart()
    self.requeue(request)
