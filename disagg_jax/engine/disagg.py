"""The disaggregated pipeline: prefill on one mesh, decode on another, KV moved in between.

Three threads, joined by queues (JetStream's split, simplified):
  prefill  — batches waiting prompts of one length bucket, runs `prefill` on the prefill mesh
             (with `--config.engine.transfer=layers:N`, as groups of N layers), emits each
             first token and cuts each request's KV out of the batch as page blocks
             (`extract`; exactly the pages its prompt fills, `transfer.pieces`);
  transfer — moves each piece to the decode mesh, one whole-buffer device-to-device copy per
             decode device (`disagg_jax.transfer.TransferPlan`), up to `transfers_in_flight`
             pieces at once; a landing thread waits for each and hands complete requests on,
             so the decode loop only ever inserts KV that has arrived. A layer group's pieces
             leave as soon as the group is computed, while the next group runs;
  decode   — inserts arrived requests into free slots (`insert_block`, donated page pool) and
             runs continuous-batching decode steps. With prefix caching, its pool keeps the
             pages of prompts it received and of sequences that ended; a new request whose
             prefix it holds and whose uncached tail fits one chunk is not sent to prefill but
             prefilled here, the tail in the colocated engine's mixed step beside the decode
             rows (conditional disaggregation; docs/PREFIX_CACHING.md).
KV that is prefilled but not yet in the page pool waits in staging buffers on the decode devices.
A `StagingBudget` of tokens bounds it: prefill reserves a request's length bucket before running
it and the reservation is released when the KV is in the pool (or the request ends), so prefill
backs off instead of filling the decode devices. Preempted requests go back to prefill.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time

import jax
import numpy as np

from disagg_jax import parallel
from disagg_jax.engine import buckets
from disagg_jax.engine.colocated import ChunkedPrefill
from disagg_jax.engine.decode_core import DecodeCore, InFlight
from disagg_jax.engine.request import HostLogprobs
from disagg_jax.engine.sampling import SamplingArrays
from disagg_jax.engine.state import RequestState
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.engine.worker import Worker
from disagg_jax.kv import cache as kv_cache
from disagg_jax.kv.pages import pages_for
from disagg_jax.sched import policy as policy_lib
from disagg_jax.transfer import pieces as pieces_lib
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
  row of the prefill mesh at least). Each request's KV goes to `handoff(request, pieces,
  bucket)` as it is computed: layer group by layer group with `bucket` None, then the last group
  with its length bucket once the request goes on to decode; `discard(request)` instead if it
  ended with its first token."""
  name = "prefill"

  def __init__(self, steps: ModelSteps, params, plan: TransferPlan, *, length_buckets,
               max_batch: int, max_tokens: int, handoff, finish, staging: StagingBudget,
               discard=None, layers_per_group: int | None = None):
    super().__init__()
    self.steps = steps
    self.params = params
    self.extract = steps.make_extract(plan)
    self.groups = pieces_lib.layer_groups(steps.cfg.num_layers,
                                          layers_per_group or steps.cfg.num_layers)
    self.group_steps = steps.prefill_groups(self.groups)
    self.length_buckets = length_buckets
    self.batch_buckets = buckets.batch_buckets(max_batch, steps.dp)
    self.max_tokens = max_tokens
    self.handoff = handoff  # (request, pieces, bucket | None) -> None
    self.discard = discard or (lambda request: None)
    self.finish = releasing(staging, finish)
    self.staging = staging

  def waiting(self) -> int:
    """Requests waiting for a prefill step."""
    return len(self.queue)

  def pending(self) -> list:
    """The requests waiting here (a snapshot)."""
    with self.cv:
      return list(self.queue)

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

  def _inputs(self, tokens, lengths, sampling, prompt_lens=None):
    sampling_arrays = SamplingArrays.from_params(
        sampling, tokens.shape[0], lengths if prompt_lens is None else prompt_lens)
    return (self.params, *self.steps.put_rows(tokens, lengths, sampling_arrays))

  def prefill_batch(self, tokens: np.ndarray, lengths: np.ndarray, sampling, on_group=None,
                    prompt_lens=None):
    """Runs one prefill step: tokens int32[B, S] (B a batch bucket), lengths int32[B], sampling
    settings of the first rows, how many of each row's tokens are its prompt (`prompt_lens`;
    default all, for the penalties) -> (first tokens int32[B] on the host, the last layer group's
    KV, the first tokens' log-probabilities on device). Layer group by layer group:
    `on_group(g, kv)` gets each group's KV as soon as it is dispatched, before the next group
    is."""
    params, inputs, lengths_d, sampling_d = self._inputs(tokens, lengths, sampling, prompt_lens)
    last = len(self.group_steps) - 1
    for g, step in enumerate(self.group_steps):
      out = step(params, inputs, lengths_d, sampling_d)
      inputs, kv = (out.tokens, out.kv) if g == last else out
      if on_group is not None:
        on_group(g, kv)
    return np.asarray(inputs), kv, out.logprobs  # `out`: the last group's PrefillResult

  def pieces(self, kv, row: int, num_pages: int, group: int) -> list[pieces_lib.Piece]:
    """Row `row`'s first `num_pages` pages of a layer group's KV, as page blocks."""
    blocks = self.extract(kv, np.int32(row), np.int32(num_pages))
    return pieces_lib.cut(blocks, self.groups[group], group, num_pages)

  def _compile(self, batch: int, length: int) -> None:
    cfg, steps = self.steps.cfg, self.steps
    args = self._inputs(np.zeros((batch, length), np.int32), np.ones(batch, np.int32), [])
    dense = parallel.dense_kv_sharding(cfg, steps.mesh)
    layer = jax.ShapeDtypeStruct((batch, length, cfg.num_kv_heads, cfg.head_dim), steps.dtype,
                                 sharding=dense)
    hidden = jax.ShapeDtypeStruct((batch, length, cfg.hidden_size), steps.dtype,
                                  sharding=parallel.batch_sharding(steps.mesh))
    sizes = set()
    for g, step in enumerate(self.group_steps):
      step.precompile(args[0], args[1] if g == 0 else (hidden, args[1]), *args[2:])
      start, stop = self.groups[g]
      sizes.add(stop - start)
    for size in sizes:
      kv = [kv_cache.LayerKV(layer, layer) for _ in range(size)]
      self.extract.precompile(kv, np.int32(0), np.int32(1))

  def run(self) -> None:
    ps = self.steps.page_size
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
      num_pages = [pages_for(int(n), ps) for n in lengths[:len(requests)]]
      held: dict[int, list] = {}

      def on_group(g, kv):
        # Every group's pieces are cut (dispatched) at once; all but the last leave at once.
        for i, request in enumerate(requests):
          if request.aborted:
            continue
          cut = self.pieces(kv, i, num_pages[i], g)
          if g == len(self.groups) - 1:
            held[i] = cut
          else:
            self.handoff(request, cut, None)
      first, _, logprobs = self.prefill_batch(tokens, lengths, [r.sampling for r in requests],
                                              on_group, [len(r.prompt_ids) for r in requests])
      logprobs = HostLogprobs.read(logprobs, [r.sampling for r in requests])
      self.record_work(int(lengths.sum()), time.perf_counter() - now)
      now = time.perf_counter()
      for i, request in enumerate(requests):
        if request.metrics.first_token is None:
          request.metrics.first_token = now
        if request.aborted or request.emit(int(first[i]), now,
                                           logprobs and logprobs.row(i, request.sampling)):
          self.discard(request)
          self.finish(request)
        else:
          self.handoff(request, held[i], bucket)

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
  """Transfer thread: each request's KV pieces to the decode mesh, one device-to-device copy per
  decode device (see TransferPlan), up to `max_in_flight` pieces dispatched and not yet landed.
  It never waits for a copy: its `landing` (a thread of its own) waits for each piece in order,
  records its timeline, and delivers a request once all its pieces are in."""

  def __init__(self, plan: TransferPlan, deliver, finish, staging: StagingBudget,
               max_in_flight: int = 4):
    self.plan = plan
    self.queue: queue.Queue = queue.Queue()
    self._slots = threading.Semaphore(max(max_in_flight, 1))
    self._stopped = False
    self.landing = TransferLanding(deliver, releasing(staging, finish), self._slots.release)

  def submit(self, request: RequestState, pieces: list, bucket: int | None) -> None:
    """Moves `pieces` of `request`'s KV; `bucket` set: they are its last, deliver it then."""
    self.queue.put(("move", request, pieces, bucket))

  def discard(self, request: RequestState) -> None:
    """`request` ended at prefill: drop its pieces already moving."""
    self.queue.put(("drop", request, [], None))

  def wake(self) -> None:
    """Nothing to do: aborted requests are dropped when their last piece has landed."""

  def stop(self) -> None:
    self._stopped = True
    self.queue.put(None)

  def run(self) -> None:
    while True:
      items = [self.queue.get()]
      # Whatever else is already waiting goes in the same dispatch: small pieces of several
      # requests travel as one batch of copies.
      while not self.queue.empty() and items[-1] is not None:
        items.append(self.queue.get())
      if not self._move([item for item in items if item is not None]) or items[-1] is None:
        return

  def _move(self, items) -> bool:
    """Dispatches the copies of `items` (as many per call as in-flight slots allow) and queues
    them, and the items' ends, for landing in order. False once stopped."""
    batch = []  # (request, piece) whose copies are dispatched together

    def flush() -> None:
      if not batch:
        return
      start = time.perf_counter()
      moved = self.plan.transfer_many([piece.arrays for _, piece in batch])
      host_s = (time.perf_counter() - start) / len(batch)
      for (request, piece), arrays in zip(batch, moved):
        self.landing.put(("piece", request, piece, arrays, host_s))
      batch.clear()

    for kind, request, pieces, bucket in items:
      for piece in pieces:
        if not self._slots.acquire(blocking=False):
          flush()  # the slots free as these land
          while not self._slots.acquire(timeout=0.1):
            if self._stopped:
              return False
        batch.append((request, piece))
      if kind == "drop" or bucket is not None:
        flush()
        self.landing.put((kind, request, bucket))
    flush()
    return True


class TransferLanding:
  """Landing thread: waits for each dispatched piece in order (its KV computed, then its copy
  landed), records it in the request's timeline, and hands a request on once its last piece is
  in (`deliver`; an aborted request goes to `finish`).

  Timeline (RequestMetrics.transfer_timeline, one entry per piece, perf_counter seconds):
  `computed` when the piece's KV was ready on the prefill mesh, `landed` when its copy was
  ready on the decode mesh (both observed at device completion, by waiting on the arrays),
  `start` = max(computed, the previous piece's landing: copies of one link run in order),
  `host_s` the host time to dispatch the copy (its share of a batch's dispatch)."""

  def __init__(self, deliver, finish, landed):
    self.deliver = deliver
    self.finish = finish
    self.landed = landed  # called once per piece landed (frees an in-flight slot)
    self.queue: queue.Queue = queue.Queue()

  def put(self, item) -> None:
    self.queue.put(item)

  def wake(self) -> None:
    """Nothing to do: aborted requests are dropped when their last piece has landed."""

  def stop(self) -> None:
    self.queue.put(None)

  def run(self) -> None:
    arrived: dict[str, list] = {}
    link_free = 0.0
    while True:
      item = self.queue.get()
      if item is None:
        return
      if item[0] == "piece":
        _, request, piece, moved, host_s = item
        jax.block_until_ready(piece.arrays)
        computed = time.perf_counter()
        jax.block_until_ready(moved)
        landed = time.perf_counter()
        self.landed()
        start = max(computed, link_free)
        link_free = landed
        m = request.metrics
        m.transfer_timeline.append({
            "group": piece.group, "layers": list(piece.layers), "first_page": piece.first_page,
            "pages": piece.num_pages, "bytes": piece.nbytes(), "computed": computed,
            "start": start, "landed": landed, "host_s": host_s})
        m.transfer_start = start if m.transfer_start is None else min(m.transfer_start, start)
        arrived.setdefault(request.request_id, []).append(
            dataclasses.replace(piece, arrays=moved))
        continue
      kind, request, bucket = item
      pieces = arrived.pop(request.request_id, [])
      if kind == "drop":
        continue
      if request.aborted:
        self.finish(request)
        continue
      request.metrics.transfer_end = time.perf_counter()
      self.deliver(request, pieces, bucket)


class DisaggDecodeLoop(Worker):
  """Decode thread: inserts arrived requests (`queue`: (request, KV, bucket)) and runs
  continuous-batching decode steps."""

  def __init__(self, core: DecodeCore, *, length_buckets, finish, requeue,
               staging: StagingBudget, layers_per_group: int | None = None,
               chunks: ChunkedPrefill | None = None, run_ahead: bool = True):
    super().__init__()
    self.core = core
    self.run_ahead = run_ahead  # --config.engine.run_ahead
    # Prefix caching: requests prefilled here (`route`), waiting for a slot, and the runner of
    # their chunks (None: every request goes through prefill).
    self.chunks = chunks
    self.local: collections.deque = collections.deque()
    num_layers = core.steps.cfg.num_layers
    self.group_sizes = [b - a for a, b in pieces_lib.layer_groups(
        num_layers, layers_per_group or num_layers)]
    self.length_buckets = length_buckets
    self.finish = releasing(staging, finish)
    self.requeue = requeue  # a preempted request goes back to prefill
    self.staging = staging
    self.trace = None  # a sched.trace.Trace: arrivals and decisions are recorded

  def route(self, request: RequestState) -> bool:
    """Takes `request` to prefill here if this pool holds a prefix of it and the rest is at most
    `--config.engine.decode_prefill_tokens` (`policy.route_local`); False: it goes to the
    prefill mesh."""
    if self.chunks is None:
      return False
    with self.cv:
      if not policy_lib.route_local(self.core.slots, request, self.chunks.max_tail):
        return False
      self.admit_local(request)
    return True

  def admit_local(self, request: RequestState) -> None:
    """Takes `request` to prefill here, whatever this pool holds of it (a router chose this
    worker; what is not cached is computed in chunks here). Needs `chunks`."""
    with self.cv:
      if self.trace is not None:
        self.trace.add("decode", "local", (request.request_id,))
      self.local.append(request)
      self.cv.notify()

  def deliver(self, request: RequestState, pieces: list, bucket: int) -> None:
    with self.cv:
      if self.trace is not None:
        self.trace.add("decode", "arrive", (request.request_id,))
      self.queue.append((request, pieces, bucket))
      self.cv.notify()

  def shapes(self, max_len: int, piece_spec):
    """(description, thunk compiling it) of the decode widths and the KV inserts of requests up
    to `max_len` tokens; piece_spec(layers, pages) is a ShapeDtypeStruct of a piece of that
    many layers and pages as it arrives."""
    core = self.core
    ps = core.steps.page_size
    out = [(f"decode rows={r} width={w}", lambda w=w, r=r: core.precompile_decode(w, r))
           for w in core.widths if w * ps <= max(max_len, core.widths[0] * ps)
           for r in core.row_buckets]
    most = max([s for s in self.length_buckets if s <= max_len] or self.length_buckets[:1])
    for layers in sorted(set(self.group_sizes)):
      for pages in pieces_lib.block_sizes(most // ps):
        piece = pieces_lib.Piece((0, layers), 0, pages, piece_spec(layers, pages))
        out.append((f"insert layers={layers} pages={pages}",
                    lambda piece=piece: self.insert_discarded([piece], precompile=True)))
    if self.chunks is not None:
      out += self.chunks.shapes(max(max_len // ps, core.widths[0]))
    out.append(("set token", lambda: core.steps.set_token.precompile(core.tokens, np.int32(0),
                                                                     np.int32(0))))
    out.append(core.history_shape())
    return out

  def run(self) -> None:
    """One step ahead: step N+1 is dispatched before step N's tokens are read, so the device
    never waits for the host's bookkeeping. Without `run_ahead`, each step's tokens are read
    before the next step is decided."""
    core = self.core
    in_flight = None
    while True:
      with self.cv:
        while (not self.stopped and not self.queue and not self.local
               and not core.slots.occupied() and in_flight is None):
          self.cv.wait()
        if self.stopped:
          return
      self._drop_aborted()
      start = time.perf_counter()
      dispatched = self.step()
      if not self.run_ahead:  # read this step now (nothing is in flight then)
        in_flight, dispatched = dispatched, None
      if in_flight is not None:
        core.collect(in_flight, self.finish)
        # Steps run back to back: an iteration that collects one takes one step's time.
        self.record_work(len(in_flight.rows), time.perf_counter() - start)
      elif dispatched is None and (self.queue or self.local):
        time.sleep(0.001)  # cannot insert with every page free; never spin on it regardless
      in_flight = dispatched

  def step(self):
    """Inserts what arrived and fits (`policy.insert_arrived`), grows the batch by a token
    (preempting as `policy.decode_step`) and dispatches the decode step; its handle, or None.
    While requests prefill here, the colocated policy plans the step instead (admitting them,
    choosing their chunks, growing and preempting) and it runs as a mixed step."""
    core = self.core
    plan = None
    with self.cv:
      inserted = policy_lib.insert_arrived(core.slots, self.queue, lambda item: item[0])
      if self.chunks is not None and (self.local or self.chunks.policy.prefilling):
        plan = self.chunks.policy.schedule(core.slots, self.local)
        decoding, preempted = plan.decode, plan.preempted
        for request in preempted:  # restarted by the policy; recomputed by prefill instead
          self.local.remove(request)
      else:
        decoding, preempted = policy_lib.decode_step(core.slots)
        for request in preempted:
          request.restart()
      if self.trace is not None:
        self.trace.add("decode", "decide",
                       policy_lib.describe_decode(core.slots, inserted, decoding, preempted))
        if plan is not None:
          self.trace.add("decode", "chunks", plan.describe(core.slots))
    for (request, pieces, bucket), slot in inserted:
      if core.slots.requests[slot] is request:  # not preempted by this very step
        self._insert(request, pieces, bucket, slot)
      self.staging.release(request)
    for request in preempted:
      self.requeue(request)
    if plan is not None and plan.runs:
      if plan.chunks:
        self.chunks.dispatch(plan.chunks)
      else:
        core.dispatch_decode(plan.decode)
      return InFlight(core.tokens, self.chunks.policy.commit(core.slots, plan), core.logprobs)
    return core.decode(decoding) if decoding else None

  def _drop_aborted(self) -> None:
    with self.cv:
      aborted = [item for item in self.queue if item[0].aborted]
      for item in aborted:
        self.queue.remove(item)
      local = [r for r in self.local if r.aborted]
      for request in local:
        self.local.remove(request)
    for request, _, _ in aborted:
      self.finish(request)
    for request in local:
      self.finish(request)
    for slot in self.core.slots.occupied():
      if self.core.slots.requests[slot].aborted:
        if self.chunks is not None:
          self.chunks.policy.forget(slot)
        self.finish(self.core.release(slot))

  def insert_discarded(self, pieces, precompile: bool = False) -> None:
    """Runs (or with `precompile` only compiles) the inserts of `pieces` with every page write
    dropped: for compiling ahead and for timing them."""
    core = self.core
    for piece in pieces:
      core.insert_block(piece, np.full(piece.num_pages, core.slots.num_pages, np.int32),
                        precompile=precompile)

  def _insert(self, request: RequestState, pieces, bucket: int, slot: int) -> None:
    """Writes `request`'s arrived KV into its slot's pages."""
    core = self.core
    core.insert(pieces, core.slots.prompt_page_ids(slot, request.num_to_compute, bucket), slot,
                request.output_ids[-1])
