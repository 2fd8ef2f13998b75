"""The colocated scheduler: one mesh, continuous batching with chunked prefill (the baseline).

Each iteration admits waiting requests into free slots, gives up to `chunk_batch` prefilling
requests a chunk of at most `chunk_size` prompt tokens, and runs them together with one decode
token for every decoding slot in a single `mixed` step (or a plain `decode` step when no prompt is
in flight). When the page pool runs dry, the youngest request is preempted and recomputed later.
"""

from __future__ import annotations

import time

import numpy as np

from disagg_jax.engine import buckets
from disagg_jax.engine.decode_core import DecodeCore
from disagg_jax.engine.state import RequestState
from disagg_jax.engine.worker import Worker


class ColocatedScheduler(Worker):
  """Runs on its own thread; `put` (a new request) and `wake` may be called from any thread.
  `queue` holds the requests waiting for a slot."""

  def __init__(self, core: DecodeCore, *, chunk_size: int, chunk_batch: int, finish):
    super().__init__()
    self.core = core
    self.chunk_size = chunk_size
    self.chunk_batches = buckets.batch_buckets(chunk_batch)
    # A step's chunks are padded to the smallest of these that fits its longest chunk, so a
    # short prompt does not pay for a full chunk.
    self.chunk_lens = buckets.length_buckets(chunk_size, page_size=1, smallest=16)
    self.finish = finish
    self.prefilling: list[int] = []  # slots whose prompt is still being computed, FIFO

  def warmup_steps(self):
    """(description, thunk) for every shape this scheduler will run, to compile ahead."""
    out = [("decode", lambda: self.core.decode([]))]
    for bc in self.chunk_batches:
      for c in self.chunk_lens:
        out.append((f"mixed chunk_batch={bc} chunk_len={c}",
                    lambda bc=bc, c=c: self._run_mixed([], [], bc, c)))
    return out

  # ------------------------------------------------------------------ scheduler thread

  def run(self) -> None:
    """One step ahead: step N+1 is dispatched before step N's tokens are read."""
    in_flight = None
    while True:
      with self.cv:
        while (not self.stopped and not self.queue and not self.core.slots.occupied()
               and in_flight is None):
          self.cv.wait()
        if self.stopped:
          return
      self._drop_aborted()
      self._admit()
      dispatched = self.dispatch()
      if in_flight is not None:
        self.core.collect(in_flight, self.finish)
      in_flight = dispatched

  def dispatch(self):
    """Schedules and dispatches one step (mixed, or decode only); None if there is nothing to
    run. Host state advances at once: chunk progress and decode positions."""
    core = self.core
    chunks = self._schedule_chunks()
    decoding = core.decoding_slots()
    need = {s: int(core.slots.positions[s]) + 1 for s in decoding}
    need.update({slot: start + n for slot, start, n in chunks})
    core.make_room(need, self._preempt)
    chunks = [c for c in chunks if core.slots.requests[c[0]] is not None]
    decoding = [s for s in decoding if core.slots.requests[s] is not None]
    if chunks:
      return self._run_mixed(chunks, decoding, buckets.pick(len(chunks), self.chunk_batches),
                             buckets.pick(max(n for _, _, n in chunks), self.chunk_lens))
    if decoding:
      return core.decode(decoding)
    return None

  def _drop_aborted(self) -> None:
    with self.cv:
      aborted = [r for r in self.queue if r.aborted]
      for request in aborted:
        self.queue.remove(request)
    for request in aborted:
      self.finish(request)
    for slot in self.core.slots.occupied():
      if self.core.slots.requests[slot].aborted:
        if slot in self.prefilling:
          self.prefilling.remove(slot)
        self.finish(self.core.release(slot))

  def _admit(self) -> None:
    """FIFO admission while a slot and the first chunk's pages are free, keeping one page per
    decoding slot in reserve so admissions do not immediately force preemptions."""
    slots = self.core.slots
    while True:
      with self.cv:
        if not self.queue:
          return
        request = self.queue[0]
        first = min(self.chunk_size, len(request.tokens_to_compute))
        if not slots.can_admit(first, reserve=len(self.core.decoding_slots())):
          return
        self.queue.popleft()
      self.prefilling.append(self.core.occupy(request, first))

  def _schedule_chunks(self) -> list[tuple[int, int, int]]:
    """(slot, start, length) of this step's prompt chunks."""
    chunks = []
    for slot in self.prefilling[:self.chunk_batches[-1]]:
      request = self.core.slots.requests[slot]
      n = min(self.chunk_size, len(request.tokens_to_compute) - request.num_computed)
      chunks.append((slot, request.num_computed, n))
      if request.metrics.prefill_start is None:
        request.metrics.prefill_start = time.perf_counter()
    return chunks

  def _preempt(self, request: RequestState) -> None:
    self.prefilling = [s for s in self.prefilling if self.core.slots.requests[s] is not None]
    request.restart()
    with self.cv:
      self.queue.appendleft(request)

  def _run_mixed(self, chunks, decoding, batch: int, length: int):
    core = self.core
    b = core.slots.num_slots
    chunk_tokens = np.zeros((batch, length), np.int32)
    chunk_slots = np.full(batch, b, np.int32)
    context = np.zeros(batch, np.int32)
    lengths = np.zeros(batch, np.int32)
    final = np.zeros(batch, bool)
    for i, (slot, start, n) in enumerate(chunks):
      request = core.slots.requests[slot]
      chunk_tokens[i, :n] = request.tokens_to_compute[start:start + n]
      chunk_slots[i], context[i], lengths[i] = slot, start, n
      final[i] = start + n == len(request.tokens_to_compute)
    core.tokens, core.kv_pages = core.steps.mixed(
        core.params, core.kv_pages, core.tokens, core.positions(), core.page_table(),
        core.sampling_arrays(), chunk_tokens, chunk_slots, context, lengths, final)
    step = core.in_flight(decoding, [slot for i, (slot, _, _) in enumerate(chunks) if final[i]])
    for slot, start, n in chunks:
      request = core.slots.requests[slot]
      request.num_computed = start + n
      if request.num_computed == len(request.tokens_to_compute):
        # The prompt is in the pool and the step wrote its first token into the slot on
        # device: the slot decodes from the next step on.
        self.prefilling.remove(slot)
        core.slots.positions[slot] = request.num_computed
    return step
