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
from disagg_jax.engine.decode_core import DecodeCore, InFlight
from disagg_jax.engine.worker import Worker
from disagg_jax.sched import policy as policy_lib


class ChunkedPrefill:
  """Runs prompt chunks on a `DecodeCore`'s mesh: the mixed step, chunks beside a decode token
  for every decoding slot. Owns the step's shape buckets (compiled once each, so kept few; see
  docs/REAL_MODELS.md): chunk rows per dp row 1 or chunk_batch / dp; chunk lengths powers of two
  from 32 up to chunk_size (a short prompt does not pay for a full chunk); page-table widths
  every other decode width. The colocated scheduler runs every prompt through it; the
  disaggregated decode loop the short uncached tails of prompts whose prefix it holds."""

  def __init__(self, core: DecodeCore, *, chunk_size: int, chunk_batch: int,
               max_tail: int = 0):
    self.core = core
    self.max_tail = max_tail  # disaggregated: the longest uncached tail prefilled here
    self.dp = core.slots.num_shards
    self.chunk_size = chunk_size
    self.rows_per_shard = buckets.chunk_rows(chunk_batch, self.dp)
    self.chunk_lens = buckets.chunk_lens(chunk_size)
    self.widths = buckets.coarser(core.widths)
    self.policy = policy_lib.ColocatedPolicy(chunk_size=chunk_size,
                                             max_chunks_per_shard=self.rows_per_shard[-1])

  def shapes(self, max_width: int):
    """(description, thunk compiling it) for every mixed-step shape whose page table is at most
    `max_width` pages wide, smallest first."""
    out = []
    for width in [w for w in self.widths if w <= max_width]:
      for rows in self.rows_per_shard:
        for c in self.chunk_lens:
          out.append((f"mixed chunks={rows * self.dp}x{c} width={width}",
                      lambda r=rows, c=c, w=width: self.run([], r, c, w, precompile=True)))
    return out

  def dispatch(self, chunks) -> None:
    """Dispatches the mixed step of `chunks` ((slot, start, length), as a `ColocatedStep` has
    them) at the smallest shape that holds them."""
    core = self.core
    now = time.perf_counter()
    for slot, _, _ in chunks:
      metrics = core.slots.requests[slot].metrics
      metrics.prefill_start = metrics.prefill_start or now
    per_shard = max(sum(1 for c in chunks if core.slots.shard_of(c[0]) == k)
                    for k in range(self.dp))
    self.run(chunks, buckets.pick(per_shard, self.rows_per_shard),
             buckets.pick(max(n for _, _, n in chunks), self.chunk_lens),
             buckets.pick(core.width(), self.widths))

  def run(self, chunks, rows_per_shard: int, length: int, width: int,
          precompile: bool = False) -> None:
    """Dispatches a mixed step with chunk rows [dp * rows_per_shard, length] (each chunk in a
    row of its slot's dp row) and a `width`-page table; with `precompile`, only compiles it.
    It decodes a token for every slot whose position is set."""
    core = self.core
    b, batch = core.slots.num_slots, rows_per_shard * self.dp
    chunk_tokens = np.zeros((batch, length), np.int32)
    chunk_slots = np.full(batch, b, np.int32)
    context = np.zeros(batch, np.int32)
    lengths = np.zeros(batch, np.int32)
    final = np.zeros(batch, bool)
    used = [0] * self.dp
    for slot, start, n in chunks:
      shard = core.slots.shard_of(slot)
      i = shard * rows_per_shard + used[shard]
      used[shard] += 1
      request = core.slots.requests[slot]
      chunk_tokens[i, :n] = request.tokens_to_compute[start:start + n]
      chunk_slots[i], context[i], lengths[i] = slot, start, n
      final[i] = start + n == len(request.tokens_to_compute)
    table = core.table_for_compiling(width) if precompile else core.page_table(width)
    core.mixed(table, core.steps.put_rows(chunk_tokens, chunk_slots, context, lengths, final),
               precompile=precompile)


class ColocatedScheduler(Worker):
  """Runs on its own thread; `put` (a new request) and `wake` may be called from any thread.
  `queue` holds the requests waiting for a slot. With `trace` set (a `sched.trace.Trace`), every
  enqueue and every decision is recorded."""
  name = "colocated"

  def __init__(self, core: DecodeCore, *, chunk_size: int, chunk_batch: int, finish,
               run_ahead: bool = True):
    super().__init__()
    self.core = core
    self.run_ahead = run_ahead  # --config.engine.run_ahead
    self.chunks = ChunkedPrefill(core, chunk_size=chunk_size, chunk_batch=chunk_batch)
    self.policy = self.chunks.policy
    self.finish = finish

  def shapes(self, max_width: int):
    """(description, thunk compiling it) for every step shape whose page table is at most
    `max_width` pages wide, smallest first."""
    return ([(f"decode rows={r} width={w}", lambda w=w, r=r: self.core.precompile_decode(w, r))
             for w in self.core.widths if w <= max_width for r in self.core.row_buckets]
            + self.chunks.shapes(max_width) + [self.core.history_shape()])

  def run_mixed_discarded(self, rows_per_shard: int, chunk_len: int, width: int) -> None:
    """Dispatches a mixed step of that shape with no chunks and no decoding rows (all writes
    dropped): for timing the step (`sim.timing`)."""
    self.chunks.run([], rows_per_shard, chunk_len, width)

  # ------------------------------------------------------------------ scheduler thread

  def run(self) -> None:
    """One step ahead: step N+1 is dispatched before step N's tokens are read. Without
    `run_ahead`, each step's tokens are read before the next step is decided."""
    in_flight = None
    while True:
      with self.cv:
        while (not self.stopped and not self.queue and not self.core.slots.occupied()
               and in_flight is None):
          self.cv.wait()
        if self.stopped:
          return
      self._drop_aborted()
      dispatched = self.dispatch()
      if not self.run_ahead:  # read this step now (nothing is in flight then)
        in_flight, dispatched = dispatched, None
      if in_flight is not None:
        self.core.collect(in_flight, self.finish)
      in_flight = dispatched

  def dispatch(self):
    """Asks the policy for the next step and dispatches it (mixed, or decode only); None if
    there is nothing to run. Host state advances at once: chunk progress and decode positions."""
    core = self.core
    with self.cv:
      step = self.policy.schedule(core.slots, self.queue)
      if self.trace is not None:
        self.trace.add(self.name, "decide", step.describe(core.slots))
    if step.chunks:
      self.chunks.dispatch(step.chunks)
    elif step.decode:
      core.dispatch_decode(step.decode)
    else:
      return None
    return InFlight(core.tokens, self.policy.commit(core.slots, step), core.logprobs)

  def _drop_aborted(self) -> None:
    with self.cv:
      aborted = [r for r in self.queue if r.aborted]
      for request in aborted:
        self.queue.remove(request)
    for request in aborted:
      self.finish(request)
    for slot in self.core.slots.occupied():
      if self.core.slots.requests[slot].aborted:
        self.policy.forget(slot)
        self.finish(self.core.release(slot))
