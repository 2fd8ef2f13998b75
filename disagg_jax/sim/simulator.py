"""Discrete-event simulation of the serving engine, driven by a step-time table.

The scheduling decisions are not re-implemented here: the simulator drives the engine's own policy
objects (`disagg_jax.sched.policy`) over a page-counting `sched.pool.SlotPool`, preemption
included, and mirrors the engine's loops around them:
- colocated (`engine/colocated.py`): each iteration asks `ColocatedPolicy.schedule` for a step
  (FIFO admission under the page reserve, chunks of the oldest prefilling requests, every
  decoding slot, preemption of the youngest when the pool runs dry), dispatches it behind the
  previous one and then collects the previous step's tokens: the loop runs one step ahead, so a
  request that finished still rides in the step dispatched before its last token was read
  (without `run_ahead`, `--config.engine.run_ahead=false`, each step is read before the next is
  decided).
- disaggregated (`engine/disagg.py`): prefill workers take `policy.prefill_batch` (the oldest
  request plus others of its length bucket, within the staging budget: the profile's
  `staging_tokens` for the in-process engine, none for a cluster's workers); each decode
  worker's transfers run one at a time; each decode loop iteration inserts arrived KV
  (`policy.insert_arrived`), grows the batch by a token
  (`policy.decode_step`; preempted requests go back to the head of the prefill queue) and
  dispatches the decode step, one step ahead like the colocated loop. Prefill and decode steps
  that overlap in time are slowed by the profile's contention factors (they share the host's
  cores on CPU). xPyD clusters (`disagg_jax/cluster`): X prefill workers on one queue, Y decode
  workers, each prefilled request routed to the decode worker with the most free pages.
Token times are step ends plus the measured `read_lag_s` (colocated: every token; disaggregated:
the first); every step is scaled by a draw from the profile's measured step-time variability
(`jitter`, seeded), so latency tails are simulated and not only medians. On CPU profiles a KV copy
waits for the decode steps queued on the destination devices.

`replay`: instead of step times from the profile, the times at which a recorded engine run took
each decision (`sched.trace.Trace`); the simulator then takes its own decisions at those times,
which `tests/sim/test_policy_equivalence.py` compares with the engine's.

The output is a list of `bench.metrics.RequestRecord`, so `metrics.compute` gives exactly the
benchmark's JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
from typing import Sequence

import numpy as np

from disagg_jax.bench.metrics import RequestRecord
from disagg_jax.engine import buckets
from disagg_jax.kv.pages import pages_for
from disagg_jax.sched import policy
from disagg_jax.sched.pool import SlotPool
from disagg_jax.sched.trace import Trace
from disagg_jax.sim.profile import StepProfile


@dataclasses.dataclass(eq=False)
class SimRequest:
  """A request as the policies see it (`sched.policy.Request`), with its simulated timeline."""
  index: int
  arrival: float
  prompt_len: int
  output_len: int
  times: list[float] = dataclasses.field(default_factory=list)
  prefill_start: float | None = None
  transfer_start: float | None = None
  transfer_end: float | None = None
  num_computed: int = 0
  compute_len: int = 0
  finish_reason: str | None = None
  staged: int = 0
  preemptions: int = 0
  migrations: int = 0  # moves of its KV to another decode worker (elastic, on_move="migrate")
  migrating: bool = False  # on its way there
  group_ready: tuple = ()  # when each layer group's KV was computed (its prefill)
  # Prefix caching: the prompt's token ids (None: no prefix can match), what the pool found
  # cached at first admission, and the pool's names of the sequence's pages.
  tokens: Sequence[int] | None = None
  cached_tokens: int | None = None
  page_names: list = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.compute_len = self.compute_len or self.prompt_len

  def all_tokens(self) -> list[int]:
    """The prompt's tokens, then stand-ins for the generated ones (negative, unique to this
    request: the simulator does not know them, so they never match another request's)."""
    prompt = list(self.tokens) if self.tokens is not None else [
        -1 - self.index * 1_000_003 - i for i in range(self.prompt_len)]
    return prompt + [-2 - self.index * 1_000_003 - self.prompt_len - i
                     for i in range(len(self.times))]

  @property
  def request_id(self) -> str:
    return str(self.index)

  @property
  def num_to_compute(self) -> int:
    return self.compute_len

  def restart(self) -> None:
    self.preemptions += 1
    self.num_computed = 0
    self.compute_len = self.prompt_len + len(self.times)

  def migrate(self, now: float) -> None:
    """Its KV leaves its decode worker for another: all but the last generated token are in
    it, and that token is the next step's input."""
    self.migrations += 1
    self.migrating = True
    self.compute_len = self.num_computed = self.prompt_len + len(self.times) - 1
    self.group_ready = (now,)

  def emit(self, t: float) -> bool:
    self.times.append(t)
    if len(self.times) >= self.output_len:
      self.finish_reason = "length"
    return self.finish_reason is not None

  def record(self) -> RequestRecord:
    first, last = self.times[0], self.times[-1]
    arrived = self.transfer_end if self.transfer_end is not None else first
    phases = {"queue": self.prefill_start - self.arrival, "prefill": first - self.prefill_start,
              "transfer": max(arrived - first, 0.0), "decode": last - max(arrived, first)}
    gaps = [b - a for a, b in zip(self.times, self.times[1:])]
    total = (self.transfer_end - self.transfer_start
             if self.transfer_start is not None and self.transfer_end is not None else None)
    return RequestRecord(self.prompt_len, len(self.times), True, first - self.arrival, gaps,
                         last - self.arrival, phases, transfer_total=total,
                         cached_tokens=self.cached_tokens or 0)


@dataclasses.dataclass
class SimResult:
  records: list[RequestRecord]
  duration: float
  preemptions: int = 0  # requests that lost their slot (and were recomputed), as in the engine
  migrations: int = 0  # decoding requests whose KV moved to another decode worker (elastic)
  # Elastic runs (`simulate_disagg(elastic=...)`): [[time, prefill devices, decode devices]] at
  # the start and after each move, the moves made, and the controller's log (JSON).
  split_timeline: list | None = None
  split_changes: int = 0
  decisions: list | None = None

  @property
  def page_stalls(self) -> int:
    """The old name of `preemptions` (before the simulator preempted, it counted the decode
    steps that would have needed one)."""
    return self.preemptions


class _Jitter:
  """Scales step times by draws from the profile's measured variability (seeded)."""

  def __init__(self, profile: StepProfile, seed: int = 0):
    self.table = np.asarray(profile.jitter or [1.0])
    self.rng = np.random.default_rng(seed)

  def __call__(self, seconds: float) -> float:
    if len(self.table) == 1:
      return seconds * float(self.table[0])
    return seconds * float(self.table[self.rng.integers(len(self.table))])


def _dispatch_blocks(profile: StepProfile) -> bool:
  """Whether dispatching a step returns only once the device ran it. On CPU profiles (the
  devices run one computation at a time, `transfer_waits_for_decode`) the loop's next decision
  comes when the step it just dispatched has run, and a step's tokens are read a `read_lag_s`
  after its end; on accelerators dispatch returns at once and the loop runs a step ahead."""
  return profile.transfer_waits_for_decode


def _pool(profile: StepProfile) -> SlotPool:
  return SlotPool(profile.decode_batch, profile.num_pages // profile.dp, profile.page_size,
                  num_shards=profile.dp,
                  prefix_caching=profile.prefix_caching)


def _requests(prompt_lens, output_lens, arrivals, prompts=None) -> list[SimRequest]:
  """`prompts`: each request's token ids (for prefix caching), or None."""
  if not len(prompt_lens) == len(output_lens) == len(arrivals):
    raise ValueError("prompt_lens, output_lens and arrivals must have one entry per request")
  if prompts is not None and [len(p) for p in prompts] != [int(n) for n in prompt_lens]:
    raise ValueError("prompts must have one token list of prompt_lens[i] tokens per request")
  return [SimRequest(i, float(a), int(p), max(int(o), 1),
                     tokens=None if prompts is None else prompts[i])
          for i, (p, o, a) in enumerate(zip(prompt_lens, output_lens, arrivals))]


def _result(requests: list[SimRequest]) -> SimResult:
  start = min(r.arrival for r in requests)
  end = max(r.times[-1] for r in requests)
  return SimResult([r.record() for r in requests], max(end - start, 1e-9),
                   sum(r.preemptions for r in requests), sum(r.migrations for r in requests))


def _context(pool: SlotPool, slots) -> int:
  """Tokens in context of `slots` once this step's token is in."""
  return int(sum(int(pool.positions[s]) + 1 for s in slots))


# ---------------------------------------------------------------------- colocated


def simulate_colocated(profile: StepProfile, prompt_lens: Sequence[int],
                       output_lens: Sequence[int], arrivals: Sequence[float], *,
                       replay: Sequence[float] | None = None,
                       trace: Trace | None = None, prompts=None) -> SimResult:
  """`replay`: the times of the engine loop's iterations (then `arrivals` are its enqueue
  times); `trace` gets each decision, as the engine records them; `prompts`: the requests'
  token ids, so that a prefix-caching profile finds shared prefixes."""
  requests = _requests(prompt_lens, output_lens, arrivals, prompts)
  pending = collections.deque(sorted(requests, key=lambda r: (r.arrival, r.index)))
  waiting: collections.deque[SimRequest] = collections.deque()
  pool = _pool(profile)
  rules = policy.ColocatedPolicy(chunk_size=profile.chunk_size,
                                 max_chunks_per_shard=profile.chunk_rows()[-1])
  lag = profile.read_lag_s
  jitter = _Jitter(profile)
  in_flight = None  # (rows, end): the dispatched step whose tokens are read next
  device_free = now = 0.0
  iteration = 0
  while True:
    if replay is not None:
      if iteration == len(replay):
        break
      now = replay[iteration]
    elif in_flight is None and not waiting and not pool.occupied():
      if not pending:
        break
      # The loop sleeps until a request comes, and takes a while to wake.
      idle = pending[0].arrival - now
      now = max(now, pending[0].arrival) + profile.wake(idle)
    iteration += 1
    while pending and pending[0].arrival <= now:
      waiting.append(pending.popleft())
    step = rules.schedule(pool, waiting)
    if trace is not None:
      trace.add("colocated", "decide", step.describe(pool), t=now)
    dispatched = None
    if step.runs:
      for slot, _, _ in step.chunks:
        request = pool.requests[slot]
        request.prefill_start = now if request.prefill_start is None else request.prefill_start
      if step.chunks:
        # The mixed step's table covers its decode rows at the step's width.
        per_shard = collections.Counter(pool.shard_of(slot) for slot, _, _ in step.chunks)
        seconds = (profile.mixed(max(per_shard.values()), max(n for _, _, n in step.chunks),
                                 pool)
                   + profile.decode_time(len(step.decode), _context(pool, step.decode))
                   - profile.decode_s)
      else:
        seconds = profile.decode_time(len(step.decode), _context(pool, step.decode),
                                      profile.decode_shape(pool, step.decode))
      device_free = max(now, device_free) + jitter(seconds)
      dispatched = (rules.commit(pool, step), device_free)
      if _dispatch_blocks(profile):
        now = device_free
    if not profile.run_ahead and dispatched is not None:
      # Read each step's tokens before deciding the next (no step in flight between them).
      in_flight, dispatched = dispatched, None
    if in_flight is not None:
      rows, end = in_flight
      now = max(now, end)
      policy.collect(pool, rows, lambda _, request, t=end + lag: request.emit(t))
    elif dispatched is None and replay is None:
      raise RuntimeError("simulation stalled: the page pool cannot hold the next request")
    in_flight = dispatched
  return _result(requests)


# ---------------------------------------------------------------------- disaggregated


@dataclasses.dataclass
class _DecodeWorker:
  pool: SlotPool
  index: int
  profile: StepProfile  # its step times (elastic runs mix tensor parallelisms)
  tp: int = 1
  next_iter: float | None = None  # when its loop iterates next (None: asleep until KV arrives)
  device_free: float = 0.0
  transfer_free: float = 0.0  # its KV transfers run one at a time
  promised: int = 0  # pages of requests routed here but not yet inserted
  serving: bool = True  # routed to (False: draining to change role, or gone)
  leaving: bool = False  # elastic, migrate / recompute: stops after its step in flight
  gone_at: float | None = None  # ... and when it stopped (its sequences moved out)
  in_flight: tuple | None = None
  transfers: collections.deque = dataclasses.field(default_factory=collections.deque)
  arrived: collections.deque = dataclasses.field(default_factory=collections.deque)

  def free_pages(self) -> int:
    return self.pool.num_free - self.promised


class _Disagg:
  """The disaggregated engine's workers around the shared policies. Event handlers only; the
  times come from `run_timed` (the profile) or `run_replay` (a recorded engine run)."""

  def __init__(self, profile: StepProfile, requests: list[SimRequest], *,
               num_prefill_workers: int, num_decode_workers: int, replaying: bool,
               trace: Trace | None):
    self.profile = profile
    self.requests = requests
    self.waiting: collections.deque[SimRequest] = collections.deque()
    self.prefill_free = [0.0] * num_prefill_workers
    self.prefill_serving = [True] * num_prefill_workers
    # Each prefill worker's step times and chips (elastic runs mix tensor parallelisms).
    self.prefill_profiles = [profile] * num_prefill_workers
    self.prefill_tps = [1] * num_prefill_workers
    self.workers = [_DecodeWorker(_pool(profile), j, profile) for j in range(num_decode_workers)]
    # The staging budget, as the engines set it: the in-process engine lets
    # `--config.engine.staging_tokens` of prefilled KV wait on its decode devices (by default
    # one full prefill step, `buckets.staging_tokens`); a cluster's workers
    # (xPyD, `disagg_jax/cluster`) keep waiting KV on the prefill side until a decode worker
    # pulls it, without a budget.
    cluster = num_prefill_workers > 1 or num_decode_workers > 1
    self.staging = policy.TokenBudget(
        2**62 if cluster else profile.staging_tokens or max(profile.length_buckets))
    self.prefill_busy_until = 0.0
    self.replaying = replaying
    self.trace = trace
    self.jitter = _Jitter(profile)
    self.bucket_of = functools.lru_cache(maxsize=None)(
        lambda n: buckets.pick(n, profile.length_buckets))
    self.live = len(requests)
    self.held: list[tuple] = []  # transfers waiting for a decode worker that serves
    self.elastic: _Elastic | None = None

  def max_batch_for(self, bucket: int) -> int:
    top = self.profile.prefill_batches()[-1]
    sizes = [b for b, s in self.profile.prefill_s if s == bucket and b <= top]
    return max(sizes, default=top)

  def release_staging(self, request: SimRequest) -> None:
    if not self.replaying:  # replayed runs release at the recorded times
      self.staging.release(request)

  # ------------------------------------------------------------------ prefill

  def prefill(self, now: float, worker: int) -> float | None:
    """One prefill decision and step; returns its end, or None if the budget is full."""
    choice = policy.prefill_batch(self.waiting, bucket_of=self.bucket_of,
                                  max_batch_for=self.max_batch_for, staging=self.staging)
    if choice is None:
      return None
    chosen, bucket = choice
    if self.trace is not None:
      self.trace.add("prefill", "decide", (tuple(r.request_id for r in chosen), bucket), t=now)
    profile = self.profile
    if not self.replaying and self.idle(now):
      now += profile.wake(now - self.busy_until())
    seconds = self.prefill_profiles[worker].prefill(len(chosen), bucket)
    decoding = sum(len(w.pool.decoding()) for w in self.workers)
    if any(w.device_free > now or decoding for w in self.workers):
      # On shared cores a prefill slows with the decode side's load: a base factor plus one per
      # decoding sequence (their streaming and bookkeeping run on the same host).
      seconds *= (profile.contention["prefill"]
                  + profile.contention.get("prefill_per_seq", 0.0) * decoding)
    end = now + self.jitter(seconds)
    self.prefill_free[worker] = end
    if self.elastic is not None:
      self.elastic.busy.append((now, end))
    self.prefill_busy_until = max(self.prefill_busy_until, end)
    for request in chosen:
      request.prefill_start = now if request.prefill_start is None else request.prefill_start
      if request.emit(end + profile.read_lag_s):
        self.release_staging(request)
        self.live -= 1
      else:
        # The KV leaves once the worker has read the first token; streamed by layer group,
        # each group as soon as it is computed.
        groups = max(profile.transfer_groups, 1)
        request.group_ready = tuple(now + (end - now) * (g + 1) / groups
                                    for g in range(groups - 1)) + (end + profile.read_lag_s,)
        self.route(now, (request.group_ready[0], request, bucket),
                   pages_for(request.num_to_compute + 1, profile.page_size))
    return end

  def route(self, now: float, entry: tuple, pages: int) -> None:
    """Queues a KV transfer (`entry`: (ready time, request, bucket)) to the serving decode
    worker with the most free pages net of those promised, as the router does; held while no
    decode worker serves (an elastic move replacing them all) and sent when one does."""
    targets = [w for w in self.workers if w.serving]
    if not targets:
      self.held.append((entry, pages))
      return
    target = max(targets, key=lambda w: w.free_pages())
    target.promised += pages
    target.transfers.append((max(entry[0], now),) + entry[1:])

  def serve(self, now: float, w: _DecodeWorker) -> None:
    """A new decode worker (elastic) serves from `now`: the held transfers go out."""
    self.workers.append(w)
    held, self.held = self.held, []
    for entry, pages in held:
      self.route(now, entry, pages)

  def idle(self, now: float) -> bool:
    """Whether every worker sleeps at `now` (nothing prefilling, decoding or in transit)."""
    return now >= self.busy_until() and all(
        w.next_iter is None and not w.transfers and not w.arrived and w.in_flight is None
        for w in self.workers)

  def busy_until(self) -> float:
    """When the engine's last work ended."""
    return max([self.prefill_busy_until]
               + [max(w.device_free, w.transfer_free) for w in self.workers])

  # ------------------------------------------------------------------ transfer

  def transfer(self, now: float, w: _DecodeWorker) -> tuple[float, tuple]:
    """Starts the head of `w`'s transfers; returns (arrival time, the arriving item)."""
    profile = w.profile
    _, request, bucket = w.transfers.popleft()
    start = now
    if not request.migrating:
      request.transfer_start = now
    if profile.transfer_waits_for_decode:
      # The copy queues behind the decode step running there and, while the loop keeps going,
      # the one it has already dispatched.
      start = max(now, w.device_free)
      decoding = w.pool.decoding()
      if decoding:
        start += profile.decode_time(len(decoding), _context(w.pool, decoding),
                                     profile.decode_shape(w.pool, decoding))
    # Only the pages the prompt fills move; group by group, each copy waiting for its group.
    tokens = pages_for(request.num_to_compute, profile.page_size) * profile.page_size
    if len(request.group_ready) <= 1:
      end = start + profile.transfer_time(tokens)
    else:
      end, per_group = start, profile.transfer_groups_time(tokens)
      for ready in request.group_ready:
        end = max(end, ready) + per_group
    if not request.migrating:
      request.transfer_end = end
    w.transfer_free = end
    return end, (request, bucket)

  def arrive(self, now: float, w: _DecodeWorker, item: tuple) -> None:
    if w.leaving:  # it left while the KV was on its way: on to another worker
      self.elastic.reroute(now, self, w, item)
      return
    w.arrived.append(item)
    if w.next_iter is None:
      # The loop slept since its last step; like a prefill worker found idle, it takes a while
      # to wake (its devices' thread pool went to sleep too).
      w.next_iter = now + w.profile.wake(now - w.device_free)

  # ------------------------------------------------------------------ decode loop

  def decode_iteration(self, now: float, w: _DecodeWorker) -> None:
    """One loop iteration: inserts, the decode step's dispatch, the previous step's tokens."""
    if w.leaving:
      self.elastic.evacuate(now, self, w)
      return
    profile = w.profile
    inserted = policy.insert_arrived(w.pool, w.arrived, lambda item: item[0])
    decoding, preempted = policy.decode_step(w.pool)
    if self.trace is not None:
      self.trace.add("decode", "decide",
                     policy.describe_decode(w.pool, inserted, decoding, preempted), t=now)
    device = max(now, w.device_free)
    for (request, bucket), _ in inserted:
      w.promised -= pages_for(request.num_to_compute + 1, profile.page_size)
      device += profile.insert_s[bucket]
      request.migrating = False
      self.release_staging(request)
    for request in preempted:
      request.restart()
      self.requeue(now, request)
    dispatched = None
    if decoding:
      seconds = profile.decode_time(len(decoding), _context(w.pool, decoding),
                                    profile.decode_shape(w.pool, decoding))
      # Slowed while a prefill runs or a request is on its way here (on CPU the prefill and
      # transfer threads' host work competes with the loop's).
      if (self.prefill_busy_until > now or w.transfers or w.arrived
          or (profile.transfer_waits_for_decode and w.transfer_free > now)):
        seconds *= profile.contention["decode"]
      rows = [(s, w.pool.requests[s]) for s in decoding]
      policy.advance(w.pool, decoding)
      device += self.jitter(seconds)
      dispatched = (rows, device)
    w.device_free = max(w.device_free, device)
    if not profile.run_ahead and dispatched is not None:
      w.in_flight, dispatched = dispatched, None  # read before the next decision
    if w.in_flight is not None:
      rows, end = w.in_flight
      for _ in policy.collect(w.pool, rows, lambda _, request, t=end: request.emit(t)):
        self.live -= 1
      w.next_iter = max(now, end)
    elif dispatched is not None:
      w.next_iter = now  # after a pause the loop dispatches twice before it first waits
    elif w.arrived and not preempted:
      raise RuntimeError("simulation stalled: the page pool cannot hold the next request")
    else:
      w.next_iter = now if w.arrived else None
    if dispatched is not None and _dispatch_blocks(profile):
      w.next_iter = max(w.next_iter, dispatched[1])
    w.in_flight = dispatched

  def requeue(self, now: float, request: SimRequest) -> None:
    if not self.replaying:  # replayed runs requeue at the recorded times
      self.waiting.appendleft(request)

  # ------------------------------------------------------------------ drivers

  def run_timed(self) -> None:
    pending = collections.deque(sorted(self.requests, key=lambda r: (r.arrival, r.index)))
    inf = float("inf")
    blocked = False  # the prefill workers wait for staging room
    arrivals: list = []  # heap of (time, seq, worker index, item): KV landing on a decode worker
    seq = 0
    while self.live:
      head = (self.waiting[0].arrival if self.waiting else
              (pending[0].arrival if pending else inf))
      # (None serving while an elastic move replaces every prefill worker.)
      p = min((i for i in range(len(self.prefill_free)) if self.prefill_serving[i]),
              key=lambda i: self.prefill_free[i], default=-1)
      t_prefill = inf if blocked or p < 0 else max(self.prefill_free[p], head)
      best = (t_prefill, 3, p)
      if self.elastic is not None:
        best = min(best, (self.elastic.next_event(), 4, -1))
      if arrivals:
        best = min(best, (arrivals[0][0], 0, -1))
      for j, w in enumerate(self.workers):
        if w.transfers:
          best = min(best, (max(w.transfer_free, w.transfers[0][0]), 1, j))
        if w.next_iter is not None:
          best = min(best, (w.next_iter, 2, j))
      now, action, index = best
      if now == inf:
        raise RuntimeError("simulation stalled: requests left but no worker can act")
      while pending and pending[0].arrival <= now:
        self.waiting.append(pending.popleft())
      if action == 0:
        _, _, j, item = heapq.heappop(arrivals)
        self.arrive(now, self.workers[j], item)
      elif action == 1:
        t, item = self.transfer(now, self.workers[index])
        heapq.heappush(arrivals, (t, seq, index, item))
        seq += 1
      elif action == 2:
        free_before = self.staging.free
        self.decode_iteration(now, self.workers[index])
        if blocked and self.staging.free > free_before:
          blocked = False
          self.prefill_free = [max(t, now) for t in self.prefill_free]
      elif action == 4:
        self.elastic.act(now, self)
      elif self.prefill(now, index) is None:
        blocked = True
        self.prefill_free[index] = now

  def run_replay(self, events: Sequence[tuple[float, str, str, tuple]]) -> None:
    """`events`: a recorded engine run's trace entries; each prefill / decode decision is taken
    at its recorded time, and enqueues, KV arrivals and staging releases happen at theirs."""
    by_id = {r.request_id: r for r in self.requests}
    w = self.workers[0]
    pending_requeue: set[str] = set()
    for t, worker, kind, payload in sorted(events, key=lambda e: e[0]):
      if worker == "prefill" and kind == "enqueue":
        request = by_id[payload[0]]
        if payload[1]:  # a preempted request, back at the head
          if payload[0] in pending_requeue:
            pending_requeue.discard(payload[0])
            self.waiting.appendleft(request)
        else:
          self.waiting.append(request)
      elif worker == "prefill" and kind == "decide":
        self.prefill(t, 0)
      elif worker == "staging" and kind == "release":
        self.staging.release(by_id[payload[0]])
      elif worker == "decode" and kind == "arrive":
        transit = [item for item in w.transfers if item[1].request_id == payload[0]]
        if transit:
          w.transfers.remove(transit[0])
          _, request, bucket = transit[0]
          request.transfer_start = request.transfer_end = t
          w.arrived.append((request, bucket))
      elif worker == "decode" and kind == "decide":
        counts = {r.request_id: r.preemptions for r in self.requests}
        self.decode_iteration(t, w)
        pending_requeue.update(r.request_id for r in self.requests
                               if r.preemptions > counts[r.request_id])


MOVES = ("drain", "migrate", "recompute")


@dataclasses.dataclass(frozen=True)
class Split:
  """A disaggregated configuration of the chips: `x` prefill workers of `ptp` chips each and `y`
  decode workers of `dtp` chips each."""
  ptp: int
  dtp: int
  x: int
  y: int

  @property
  def key(self) -> tuple:
    return (self.ptp, self.dtp, self.x, self.y)

  @property
  def prefill_devices(self) -> int:
    return self.x * self.ptp

  @property
  def decode_devices(self) -> int:
    return self.y * self.dtp


class _Elastic:
  """Reconfigures the workers as `controller` decides, every `config.window_s` of simulated
  time, among `splits` (`Split`s of the same chips; `profile_of(ptp, dtp)` gives each one's step
  times). A move to another split keeps the workers the two have in common (same side and TP)
  and replaces the others: a leaving prefill worker finishes its batch; a leaving decode worker,
  by `on_move`, finishes every sequence it holds and takes no new one ("drain", as a
  `--cluster=ray` worker does), or stops after its step in flight and its sequences' KV moves to
  the other decode workers ("migrate", a KV transfer each; held until a decode worker serves),
  or they restart from their tokens on the prefill side ("recompute", as the in-process
  `--elastic` engine does). A new worker takes the chips the leaving ones free, in the order
  they free them, and serves `switch_s` later (weights placed, steps compiled)."""

  def __init__(self, controller, splits: Sequence[Split], start: Split, profile_of,
               on_move: str = "drain"):
    if on_move not in MOVES:
      raise ValueError(f"on_move={on_move!r} is not one of {', '.join(MOVES)}")
    if start not in splits:
      raise ValueError(f"the starting split {start.key} is not one of the splits")
    self.controller, self.splits, self.current = controller, list(splits), start
    self.profile_of, self.on_move = profile_of, on_move
    self.config = controller.config
    self.next_check = self.config.window_s
    self.target: Split | None = None  # the split a move in progress goes to
    self.leaving_decode: list[int] = []
    self.freed: list[float] = []  # when each chip the leaving workers held became free
    self.to_start: collections.deque = collections.deque()  # (side, tp) of workers to start
    self.pending: list[tuple[float, str, int]] = []  # (ready time, side, tp)
    self.timeline: list[list[float]] = []  # the start, then one entry per worker started
    self.busy: collections.deque = collections.deque()  # (start, end) of prefill steps

  def split(self, sim: "_Disagg") -> tuple[int, int]:
    """(prefill chips, decode chips) serving now."""
    return (sum(tp for tp, serving in zip(sim.prefill_tps, sim.prefill_serving) if serving),
            sum(w.tp for w in sim.workers if w.serving))

  def next_event(self) -> float:
    return min([self.next_check] + [t for t, _, _ in self.pending])

  # ------------------------------------------------------------------ moves

  def begin(self, now: float, sim: "_Disagg", target: Split) -> None:
    """Starts the move from the current split to `target`."""
    cur, self.target = self.current, target
    keep = min(cur.x, target.x) if cur.ptp == target.ptp else 0
    for i in [i for i, serving in enumerate(sim.prefill_serving) if serving][keep:]:
      sim.prefill_serving[i] = False
      self.freed += [max(now, sim.prefill_free[i])] * sim.prefill_tps[i]
      sim.prefill_free[i] = float("inf")
    keep = min(cur.y, target.y) if cur.dtp == target.dtp else 0
    serving = sorted((w for w in sim.workers if w.serving), key=lambda w: len(w.pool.occupied()))
    for w in serving[:len(serving) - keep]:
      w.serving = False
      w.leaving = self.on_move != "drain"
      self.leaving_decode.append(w.index)
      if w.leaving:
        if w.next_iter is None:
          w.next_iter = now  # asleep: it leaves at once
        for item in list(w.transfers):  # not started: they go elsewhere from the prefill side
          w.transfers.remove(item)
          self.reroute(now, sim, w, item, transferred=False)
    sides = [("prefill", target.ptp)] * (target.x - sum(sim.prefill_serving))
    sides += [("decode", target.dtp)] * (target.y - sum(w.serving for w in sim.workers))
    # The side the move grows first (its new workers take the first chips freed).
    self.to_start.extend(sorted(sides, key=lambda s: s[0] != ("prefill" if target.prefill_devices
                                                           >= cur.prefill_devices else "decode")))

  def reroute(self, now: float, sim: "_Disagg", w: _DecodeWorker, item: tuple, *,
              transferred: bool = True) -> None:
    """A request routed to `w`, which is leaving, goes to another decode worker: its KV moves
    again if it had reached `w` (`transferred`; `item` is (request, bucket)), else it leaves the
    prefill side for the other (`item` is a transfer entry, (ready, request, bucket))."""
    request, bucket = item[-2:]
    pages = pages_for(request.num_to_compute + 1, w.profile.page_size)
    w.promised -= pages
    if transferred:
      request.group_ready = (now,)
    sim.route(now, (request.group_ready[0], request, bucket), pages)

  def evacuate(self, now: float, sim: "_Disagg", w: _DecodeWorker) -> None:
    """A leaving decode worker's last iteration: its step in flight is collected, then its
    sequences migrate (or restart on the prefill side) and its chips are free."""
    if w.in_flight is not None:
      rows, end = w.in_flight
      now = max(now, end)
      for _ in policy.collect(w.pool, rows, lambda _, request, t=end: request.emit(t)):
        sim.live -= 1
      w.in_flight = None
    for slot in w.pool.occupied():
      request = w.pool.release(slot)
      if self.on_move == "migrate":
        request.migrate(now)
        bucket = sim.bucket_of(min(request.num_to_compute, max(w.profile.length_buckets)))
        sim.route(now, (now, request, bucket),
                  pages_for(request.num_to_compute + 1, w.profile.page_size))
      else:
        request.restart()
        sim.requeue(now, request)
    while w.arrived:  # prefilled KV that reached it but was not inserted yet
      self.reroute(now, sim, w, w.arrived.popleft())
    w.next_iter = None
    if w.gone_at is None:
      w.gone_at = w.device_free = now

  def act(self, now: float, sim: "_Disagg") -> None:
    for j in list(self.leaving_decode):
      w = sim.workers[j]
      if w.leaving:  # stopped once its step in flight ended (KV still on its way to it is
        gone = w.gone_at is not None  # passed on as it lands)
      else:  # draining: once it holds nothing and nothing comes
        gone = (not w.pool.occupied() and not w.transfers and not w.arrived
                and w.in_flight is None and w.promised <= 0)
      if gone:
        self.leaving_decode.remove(j)
        self.freed += [max(now, w.device_free)] * w.tp
    while self.to_start and len(self.freed) >= self.to_start[0][1]:
      side, tp = self.to_start.popleft()
      self.freed.sort()
      chips, self.freed = self.freed[:tp], self.freed[tp:]
      self.pending.append((max(chips) + self.config.switch_s, side, tp))
    for item in sorted(p for p in self.pending if p[0] <= now):
      self.pending.remove(item)
      _, side, tp = item
      if side == "decode":
        profile = self.profile_of(self.target.ptp, tp)
        sim.serve(now, _DecodeWorker(_pool(profile), len(sim.workers), profile, tp))
      else:
        sim.prefill_free.append(now)
        sim.prefill_serving.append(True)
        sim.prefill_profiles.append(self.profile_of(tp, self.target.dtp))
        sim.prefill_tps.append(tp)
      self.timeline.append([now, *self.split(sim)])
    if self.target is not None and not (self.pending or self.to_start or self.leaving_decode):
      self.current, self.target = self.target, None
    if now < self.next_check:
      return
    self.next_check = now + self.config.window_s
    if self.target is not None:  # one move at a time
      return
    signals, options = self.signals(now, sim)
    if self.controller.decide(signals, options, self.current.key):
      key = tuple(self.controller.log[-1].target)
      self.begin(now, sim, next(s for s in self.splits if s.key == key))

  # ------------------------------------------------------------------ signals

  def signals(self, now: float, sim: "_Disagg"):
    """The window's `Signals`, and every split as a `SplitOption` with its capacities at the
    window's typical request (from each split's profile)."""
    from disagg_jax.sched.elastic import Signals, SplitOption  # pylint: disable=g-import-not-at-top
    c, window = self.config, self.config.window_s
    ttft_ok = ttft_n = tpot_ok = tpot_n = 0
    for r in sim.requests:
      if r.times and now - window < r.times[0] <= now:
        ttft_n += 1
        ttft_ok += r.times[0] - r.arrival <= c.ttft_slo_s
      elif not r.times and r.arrival <= now and now - r.arrival > c.ttft_slo_s:
        ttft_n += 1  # waiting past its SLO already: a miss to come
      recent = [t for t in r.times[1:] if now - window < t <= now]
      if recent:
        k = len(r.times) - len([t for t in r.times if t > now - window])
        start = r.times[max(k - 1, 0)]
        tpot_n += 1
        tpot_ok += (recent[-1] - start) / len(recent) <= c.tpot_slo_s
    serving = [w for w in sim.workers if w.serving]
    slots = sum(w.pool.num_slots for w in serving) or 1
    pages = sum(w.pool.capacity for w in serving) or 1
    queued = sum(r.num_to_compute for r in sim.waiting)
    arrived = [r for r in sim.requests if now - window < r.arrival <= now]
    lengths = [r.prompt_len for r in arrived or sim.waiting] or [max(sim.profile.length_buckets)]
    # Sequences decode at their mean context but hold pages up to their last token.
    context = (float(np.mean([r.prompt_len + r.output_len / 2 for r in arrived]))
               if arrived else 0.0)
    peak = float(np.mean([r.prompt_len + r.output_len for r in arrived])) if arrived else 0.0
    capacity = {}  # (ptp, dtp) -> (prefill tokens/s, decode tokens/s) of one worker each

    def per_worker(ptp: int, dtp: int) -> tuple[float, float]:
      if (ptp, dtp) not in capacity:
        profile = self.profile_of(ptp, dtp)
        # A prefill worker's rate in prompt tokens/s: each typical prompt costs its share of a
        # full batch of its length bucket.
        cost = np.mean([profile.prefill(sim.max_batch_for(b), b) / sim.max_batch_for(b)
                        for b in map(sim.bucket_of, lengths)])
        capacity[ptp, dtp] = (float(np.mean(lengths)) / max(float(cost), 1e-9),
                              self._decode_capacity(profile, context, peak) if arrived else 0.0)
      return capacity[ptp, dtp]

    options = [SplitOption(s.key, s.prefill_devices, s.decode_devices,
                           s.x * per_worker(s.ptp, s.dtp)[0], s.y * per_worker(s.ptp, s.dtp)[1],
                           s.x, s.y * self.profile_of(s.ptp, s.dtp).num_pages)
               for s in self.splits]
    cur = self.current
    while self.busy and self.busy[0][1] <= now - window:
      self.busy.popleft()
    busy = sum(max(0.0, min(b, now) - max(a, now - window)) for a, b in self.busy)
    prefill_rate, decode_rate = per_worker(cur.ptp, cur.dtp)
    signals = Signals(
        time=now, prefill_workers=sum(sim.prefill_serving), decode_workers=len(serving),
        queued_prefill_tokens=int(queued),
        prefill_tokens_per_s=prefill_rate * max(sum(sim.prefill_serving), 1),
        prefill_busy=busy / (window * max(sum(sim.prefill_serving), 1)),
        decode_slot_use=sum(len(w.pool.occupied()) for w in serving) / slots,
        decode_page_use=sum(w.pool.capacity - w.pool.num_free for w in serving) / pages,
        ttft_attainment=ttft_ok / ttft_n if ttft_n else None,
        tpot_attainment=tpot_ok / tpot_n if tpot_n else None,
        arriving_prompt_tokens_per_s=sum(r.prompt_len for r in arrived) / window,
        arriving_output_tokens_per_s=sum(r.output_len for r in arrived) / window,
        arriving_requests_per_s=len(arrived) / window,
        decode_pages_used=sum(w.pool.capacity - w.pool.num_free for w in serving),
        decode_pages_total=sum(w.pool.capacity for w in serving),
        decode_tokens_per_s_per_worker=decode_rate)
    return signals, options

  def _decode_capacity(self, profile: StepProfile, context: float, peak: float) -> float:
    """Tokens/s one decode worker serves at sequences of `context` tokens: the largest batch
    whose step meets the TPOT SLO (at least one sequence) and whose sequences its pages hold at
    `peak` tokens each (more would be admitted, then preempted as they grow)."""
    best = 0.0
    fits = profile.num_pages // pages_for(int(peak) + 1, profile.page_size)
    for b in range(1, max(min(profile.decode_batch, fits), 1) + 1):
      seconds = profile.decode_time(b, int(b * context), None)
      if seconds > self.config.tpot_slo_s and b > 1:
        break
      best = max(best, b / seconds)
    return best


def simulate_disagg(profile: StepProfile, prompt_lens: Sequence[int],
                    output_lens: Sequence[int], arrivals: Sequence[float], *,
                    num_prefill_workers: int = 1, num_decode_workers: int = 1,
                    replay: Sequence[tuple] | None = None,
                    trace: Trace | None = None, prompts=None, elastic=None,
                    devices_per_worker: int = 1, splits: Sequence[Split] | None = None,
                    profile_of=None, on_move: str = "drain") -> SimResult:
  """xPyD: prefill workers share one FIFO queue (the cluster router sends each request to the
  prefill worker with the fewest queued tokens, which this approximates); a prefilled request
  goes to the decode worker with the most free pages net of those promised to requests on their
  way, as the router does; each decode worker's transfers run one at a time. `replay`: a
  recorded engine run's trace entries (one prefill and one decode worker). `elastic`: a
  `sched.elastic.ElasticController` reconfiguring the workers as the traffic changes (`_Elastic`;
  the result then carries the split's timeline and the log): among `splits` (`Split`s, each
  simulated with `profile_of(ptp, dtp)`), or by default every split of the starting workers
  (`devices_per_worker` chips each, `profile`); `on_move`: what a leaving decode worker does
  with its sequences ("drain", "migrate" or "recompute")."""
  requests = _requests(prompt_lens, output_lens, arrivals, prompts)
  sim = _Disagg(profile, requests, num_prefill_workers=num_prefill_workers,
                num_decode_workers=num_decode_workers, replaying=replay is not None,
                trace=trace)
  if elastic is not None:
    tp, n = devices_per_worker, num_prefill_workers + num_decode_workers
    start = Split(tp, tp, num_prefill_workers, num_decode_workers)
    if splits is None:
      splits = [Split(tp, tp, x, n - x) for x in range(1, n)]
      profile_of = lambda *_: profile
    else:
      start = next((s for s in splits if s.x == num_prefill_workers
                    and s.y == num_decode_workers and profile_of(s.ptp, s.dtp) is profile),
                   None)
      if start is None:
        raise ValueError("the starting workers and `profile` must be one of `splits` "
                         "(profile_of(ptp, dtp) is profile)")
    sim.elastic = _Elastic(elastic, splits, start, profile_of, on_move)
    sim.staging = policy.TokenBudget(2**62)  # workers come and go: a cluster's (no budget)
    sim.prefill_tps = [start.ptp] * num_prefill_workers
    for w in sim.workers:
      w.tp = start.dtp
    sim.elastic.timeline.append([0.0, *sim.elastic.split(sim)])
  if replay is None:
    sim.run_timed()
  else:
    sim.run_replay(replay)
  if replay is not None:
    return SimResult([], 0.0)
  result = _result(requests)
  if sim.elastic is not None:
    result.split_timeline = sim.elastic.timeline
    result.split_changes = len(sim.elastic.timeline) - 1
    result.decisions = [d.to_json() for d in elastic.log]
  return result


def simulate(profile: StepProfile, prompt_lens, output_lens, arrivals, *,
             num_prefill_workers: int = 1, num_decode_workers: int = 1,
             prompts=None) -> SimResult:
  """`prompts`: the requests' token ids (optional; with them a prefix-caching profile reuses
  shared prefixes, as the engine does)."""
  if profile.mode == "colocated":
    return simulate_colocated(profile, prompt_lens, output_lens, arrivals, prompts=prompts)
  if profile.mode == "disagg":
    return simulate_disagg(profile, prompt_lens, output_lens, arrivals,
                           num_prefill_workers=num_prefill_workers,
                           num_decode_workers=num_decode_workers, prompts=prompts)
  raise ValueError(f"profile mode {profile.mode!r} is not colocated or disagg")
