"""The colocated scheduler: one mesh, continuous batching with chunked prefill (the baseline).

Each iteration admits waiting requests into free slots, gives up to `chunk_batch` prefilling
requests a chunk of at most `chunk_size` prompt tokens, and runs them together with one decode
token for every decoding slot in a single `mixed` step (or a plain `decode` step when no prompt is
in flight). When the page pool runs dry, the youngest request is preempted and recomputed later.
On a mesh with dp rows, each dp row computes its own slots' chunks: chunk_batch / dp chunk rows
per dp row, each holding a chunk of one of that row's slots.
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
    self.dp = core.slots.num_shards
    # The mixed step's shapes (compiled once each, so kept few; see docs/REAL_MODELS.md):
    # chunk rows per dp row 1 or chunk_batch / dp; chunk lengths powers of two from 32 up to
    # chunk_size (a short prompt does not pay for a full chunk); page-table widths every other
    # decode width.
    self.rows_per_shard = buckets.chunk_rows(chunk_batch, self.dp)
    self.chunk_lens = buckets.chunk_lens(chunk_size)
    self.widths = buckets.coarser(core.widths)
    self.finish = finish
    self.prefilling: list[int] = []  # slots whose prompt is still being computed, FIFO

  def shapes(self, max_width: int):
    """(description, thunk compiling it) for every step shape whose page table is at most
    `max_width` pages wide, smallest first."""
    out = [(f"decode rows={r} width={w}", lambda w=w, r=r: self.core.precompile_decode(w, r))
           for w in self.core.widths if w <= max_width for r in self.core.row_buckets]
    for width in [w for w in self.widths if w <= max_width]:
      for rows in self.rows_per_shard:
        for c in self.chunk_lens:
          out.append((f"mixed chunks={rows * self.dp}x{c} width={width}",
                      lambda r=rows, c=c, w=width: self._run_mixed([], [], r, c, w,
                                                                   precompile=True)))
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
      per_shard = max(sum(1 for c in chunks if core.slots.shard_of(c[0]) == k)
                      for k in range(self.dp))
      return self._run_mixed(chunks, decoding, buckets.pick(per_shard, self.rows_per_shard),
                             buckets.pick(max(n for _, _, n in chunks), self.chunk_lens),
                             buckets.pick(core.width(), self.widths))
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
        if not slots.can_admit(first):
          return
        self.queue.popleft()
      self.prefilling.append(self.core.occupy(request, first))

  def _schedule_chunks(self) -> list[tuple[int, int, int]]:
    """(slot, start, length) of this step's prompt chunks: the oldest prefilling slots, at most
    `rows_per_shard[-1]` of each dp row."""
    chunks = []
    taken = [0] * self.dp
    for slot in self.prefilling:
      shard = self.core.slots.shard_of(slot)
      if taken[shard] == self.rows_per_shard[-1]:
        continue
      taken[shard] += 1
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

  def _run_mixed(self, chunks, decoding, rows_per_shard: int, length: int, width: int,
                 precompile: bool = False):
    """Dispatches a mixed step with chunk rows [dp * rows_per_shard, length] (each chunk in a
    row of its slot's dp row) and a `width`-page table; with `precompile`, only compiles it."""
    core = self.core
    b, batch = core.slots.num_slots, rows_per_shard * self.dp
    chunk_tokens = np.zeros((batch, length), np.int32)
    chunk_slots = np.full(batch, b, np.int32)
    context = np.zeros(batch, np.int32)
    lengths = np.zeros(batch, np.int32)
    final = np.zeros(batch, bool)
    used = [0] * self.dp
    rows = []
    for slot, start, n in chunks:
      shard = core.slots.shard_of(slot)
      i = shard * rows_per_shard + used[shard]
      used[shard] += 1
      rows.append(i)
      request = core.slots.requests[slot]
      chunk_tokens[i, :n] = request.tokens_to_compute[start:start + n]
      chunk_slots[i], context[i], lengths[i] = slot, start, n
      final[i] = start + n == len(request.tokens_to_compute)
    table = core.table_for_compiling(width) if precompile else core.page_table(width)
    args = (core.params, core.kv_pages, core.tokens, core.positions(), table,
            core.sampling_arrays(), *core.steps.put_rows(chunk_tokens, chunk_slots, context,
                                                          lengths, final))
    if precompile:
      core.steps.mixed.precompile(*args)
      return None
    core.tokens, core.kv_pages = core.steps.mixed(*args)
    step = core.in_flight(decoding, [slot for (slot, _, _), i in zip(chunks, rows) if final[i]])
    for slot, start, n in chunks:
      request = core.slots.requests[slot]
      request.num_computed = start + n
      if request.num_computed == len(request.tokens_to_compute):
        # The prompt is in the pool and the step wrote its first token into the slot on
        # device: the slot decodes from the next step on.
        self.prefilling.remove(slot)
        core.slots.positions[slot] = request.num_computed
    return step
