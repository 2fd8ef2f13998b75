"""Discrete-event simulation of the serving engine's schedulers, driven by a step-time table.

The policies are the engine's own, step for step:
- colocated (`engine/colocated.py`): FIFO admission while a slot and the first chunk's pages are
  free, keeping one page per decoding slot in reserve; each step runs up to `chunk_batch` prompt
  chunks of at most `chunk_size` tokens (oldest first) together with every decoding slot, padded
  to the (chunk batch, chunk length) bucket; a prompt's last chunk yields its first token.
- disaggregated (`engine/disagg.py`): the prefill worker takes the oldest waiting request plus
  others of its length bucket up to `prefill_batch`, while fewer than `decode_batch` requests are
  prefilled but not yet decoding; the transfer worker moves one request's KV at a time; the decode
  loop inserts arrived KV in FIFO order under the same page reserve, then runs one decode step
  over all slots. Prefill and decode steps that overlap in time are slowed by the profile's
  contention factors (they share the host's cores on CPU). xPyD clusters (`disagg_jax/cluster`):
  X prefill workers on one queue, Y decode workers, each prefilled request routed to the decode
  worker with the most free pages.
Token times are step ends plus the measured `read_lag_s` (colocated: every token; disaggregated:
the first); every step is scaled by a draw from the profile's measured step-time variability
(`jitter`, seeded), so latency tails are simulated and not only medians. On CPU profiles a KV copy waits for the decode steps queued on
the destination devices. Requests are never preempted here: the page pool is checked at
admission (with the engine's reserve), and a configuration whose pool would run dry mid-decode is
reported through `SimResult.page_stalls` rather than simulated.

The output is a list of `bench.metrics.RequestRecord`, so `metrics.compute` gives exactly the
benchmark's JSON.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from disagg_jax.bench.metrics import RequestRecord
from disagg_jax.engine import buckets
from disagg_jax.sim.profile import StepProfile


@dataclasses.dataclass
class _Request:
  index: int
  arrival: float
  prompt_len: int
  output_len: int
  times: list[float] = dataclasses.field(default_factory=list)
  prefill_start: float | None = None
  transfer_start: float | None = None
  transfer_end: float | None = None
  computed: int = 0  # prompt tokens in the KV cache (colocated chunking)
  slot_pages: int = 0

  def record(self) -> RequestRecord:
    first, last = self.times[0], self.times[-1]
    arrived = self.transfer_end if self.transfer_end is not None else first
    phases = {"queue": self.prefill_start - self.arrival, "prefill": first - self.prefill_start,
              "transfer": arrived - first, "decode": last - arrived}
    gaps = [b - a for a, b in zip(self.times, self.times[1:])]
    return RequestRecord(self.prompt_len, len(self.times), True, first - self.arrival, gaps,
                         last - self.arrival, phases)


@dataclasses.dataclass
class SimResult:
  records: list[RequestRecord]
  duration: float
  page_stalls: int = 0  # decode steps that would have needed a preemption in the engine


class _Jitter:
  """Scales step times by draws from the profile's measured variability (seeded)."""

  def __init__(self, profile: StepProfile, seed: int = 0):
    self.table = np.asarray(profile.jitter or [1.0])
    self.rng = np.random.default_rng(seed)

  def __call__(self, seconds: float) -> float:
    if len(self.table) == 1:
      return seconds * float(self.table[0])
    return seconds * float(self.table[self.rng.integers(len(self.table))])


def _pages(tokens: int, page_size: int) -> int:
  return -(-tokens // page_size)


class _Pool:
  """Decode slots and pages, with the engine's admission rule."""

  def __init__(self, profile: StepProfile):
    self.free_slots = profile.decode_batch
    self.free_pages = profile.num_pages
    self.page_size = profile.page_size
    self.stalls = 0

  def can_admit(self, tokens: int, reserve: int) -> bool:
    return self.free_slots > 0 and _pages(tokens, self.page_size) + reserve <= self.free_pages

  def occupy(self, request: _Request, tokens: int) -> None:
    self.free_slots -= 1
    request.slot_pages = _pages(tokens, self.page_size)
    self.free_pages -= request.slot_pages

  def grow(self, request: _Request, tokens: int) -> None:
    need = _pages(tokens, self.page_size) - request.slot_pages
    if need > 0:
      if need > self.free_pages:
        self.stalls += 1
      self.free_pages -= need
      request.slot_pages += need

  def release(self, request: _Request) -> None:
    self.free_slots += 1
    self.free_pages += request.slot_pages
    request.slot_pages = 0


def _requests(prompt_lens, output_lens, arrivals) -> list[_Request]:
  if not len(prompt_lens) == len(output_lens) == len(arrivals):
    raise ValueError("prompt_lens, output_lens and arrivals must have one entry per request")
  return [_Request(i, float(a), int(p), max(int(o), 1))
          for i, (p, o, a) in enumerate(zip(prompt_lens, output_lens, arrivals))]


def _result(requests: list[_Request], pool: _Pool) -> SimResult:
  start = min(r.arrival for r in requests)
  end = max(r.times[-1] for r in requests)
  return SimResult([r.record() for r in requests], max(end - start, 1e-9), pool.stalls)


def simulate_colocated(profile: StepProfile, prompt_lens: Sequence[int],
                       output_lens: Sequence[int], arrivals: Sequence[float]) -> SimResult:
  requests = _requests(prompt_lens, output_lens, arrivals)
  pending = collections.deque(sorted(requests, key=lambda r: r.arrival))
  queue: collections.deque[_Request] = collections.deque()
  prefilling: list[_Request] = []
  decoding: list[_Request] = []
  pool = _Pool(profile)
  chunk_batches = buckets.chunk_rows(profile.chunk_batch)
  now = 0.0
  remaining = len(requests)
  lagging: list[tuple[_Request, float]] = []  # tokens produced by the last step, not yet read
  finishing: list[_Request] = []
  lag = profile.read_lag_s
  jitter = _Jitter(profile)
  while remaining or lagging:
    if lagging:
      for request, t in lagging:
        request.times.append(t + lag)
      lagging = []
    if not remaining:
      break
    while pending and pending[0].arrival <= now:
      queue.append(pending.popleft())
    while queue:  # admission
      request = queue[0]
      first = min(profile.chunk_size, request.prompt_len)
      if not pool.can_admit(first, reserve=len(decoding)):
        break
      queue.popleft()
      pool.occupy(request, first)
      prefilling.append(request)
    chunks = []
    for request in prefilling[:chunk_batches[-1]]:
      n = min(profile.chunk_size, request.prompt_len - request.computed)
      chunks.append((request, n))
      if request.prefill_start is None:
        request.prefill_start = now
    for request in decoding:
      pool.grow(request, request.prompt_len + len(request.times) + 1)
    for request, n in chunks:
      pool.grow(request, request.computed + n)
    context = sum(r.prompt_len + len(r.times) for r in decoding)
    extra = profile.decode_time(len(decoding), context) - profile.decode_s
    if chunks:
      end = now + jitter(profile.mixed(len(chunks), max(n for _, n in chunks)) + extra)
    elif decoding:
      end = now + jitter(profile.decode_s + extra)
    else:
      if pending:
        now = pending[0].arrival
      continue
    # Tokens reach their requests `read_lag_s` after the step ends (measured: the loop reads a
    # step's tokens after dispatching the next one).
    still = []
    for request in decoding:
      lagging.append((request, end))
      if len(request.times) + 1 >= request.output_len:
        finishing.append(request)
      else:
        still.append(request)
    decoding = still
    for request, n in chunks:
      request.computed += n
      if request.computed == request.prompt_len:
        prefilling.remove(request)
        lagging.append((request, end))
        if request.output_len == 1:
          finishing.append(request)
        else:
          decoding.append(request)
    for request in finishing:
      pool.release(request)
      remaining -= 1
    finishing = []
    now = end
  return _result(requests, pool)


@dataclasses.dataclass
class _DecodeWorker:
  pool: _Pool
  free: float = 0.0  # the decode loop's next step
  transfer_free: float = 0.0  # its KV transfers run one at a time
  busy_until: float = 0.0
  promised: int = 0  # pages of requests routed here but not yet inserted
  decoding: list = dataclasses.field(default_factory=list)
  transfers: collections.deque = dataclasses.field(default_factory=collections.deque)
  arrived: collections.deque = dataclasses.field(default_factory=collections.deque)

  def free_pages(self) -> int:
    return self.pool.free_pages - self.promised


def simulate_disagg(profile: StepProfile, prompt_lens: Sequence[int],
                    output_lens: Sequence[int], arrivals: Sequence[float], *,
                    num_prefill_workers: int = 1, num_decode_workers: int = 1) -> SimResult:
  """xPyD: prefill workers share one FIFO queue (the cluster router sends each request to the
  prefill worker with the fewest queued tokens, which this approximates); a prefilled request
  goes to the decode worker with the most free pages net of those promised to requests on their
  way, as the router does; each decode worker's transfers run one at a time."""
  requests = _requests(prompt_lens, output_lens, arrivals)
  pending = collections.deque(sorted(requests, key=lambda r: r.arrival))
  prefill_queue: list[_Request] = []
  prefill_free = [0.0] * num_prefill_workers
  workers = [_DecodeWorker(_Pool(profile)) for _ in range(num_decode_workers)]
  backlog = profile.decode_batch * num_decode_workers  # prefilled, not yet decoding, at most
  prefill_busy_until = 0.0
  remaining = len(requests)
  inf = float("inf")
  bucket_of = lambda n: buckets.pick(n, profile.length_buckets)
  jitter = _Jitter(profile)

  while remaining:
    head = prefill_queue[0].arrival if prefill_queue else (pending[0].arrival if pending else inf)
    p_index = min(range(num_prefill_workers), key=lambda i: prefill_free[i])
    t_prefill = max(prefill_free[p_index], head) if backlog > 0 else inf
    best = (t_prefill, 2, p_index)
    for j, w in enumerate(workers):
      if w.transfers:
        best = min(best, (max(w.transfer_free, w.transfers[0][0]), 0, j))
      if w.decoding:
        best = min(best, (w.free, 1, j))
      elif w.arrived:
        best = min(best, (max(w.free, w.arrived[0][0]), 1, j))
    now, action, index = best
    if now == inf:
      raise RuntimeError("simulation stalled: requests left but no worker can act")
    while pending and pending[0].arrival <= now:
      prefill_queue.append(pending.popleft())

    if action == 0:  # one KV transfer
      w = workers[index]
      _, request, bucket = w.transfers.popleft()
      request.transfer_start = now
      start = now
      if profile.transfer_waits_for_decode:
        # The copy queues behind the decode step running there and, while the loop keeps going,
        # the one it has already dispatched.
        start = max(now, w.busy_until)
        if w.decoding:
          start += profile.decode_time(len(w.decoding),
                                       sum(r.prompt_len + len(r.times) for r in w.decoding))
      request.transfer_end = start + profile.transfer_s[bucket]
      w.transfer_free = request.transfer_end
      w.arrived.append((request.transfer_end, request, bucket))
    elif action == 1:  # insert what arrived, then one decode step
      w = workers[index]
      while w.arrived:
        ready, request, bucket = w.arrived[0]
        if ready > now or not w.pool.can_admit(request.prompt_len + 1,
                                               reserve=len(w.decoding)):
          break
        w.arrived.popleft()
        w.promised -= _pages(request.prompt_len + 1, profile.page_size)
        backlog += 1
        w.pool.occupy(request, request.prompt_len + 1)
        now += profile.insert_s[bucket]
        w.decoding.append(request)
      if not w.decoding:
        # Nothing fits the pool and nothing decodes: impossible when the pool holds one
        # max_seq_len sequence, which the engine enforces.
        raise RuntimeError("simulation stalled: the page pool cannot hold the next request")
      for request in w.decoding:
        w.pool.grow(request, request.prompt_len + len(request.times) + 1)
      step = profile.decode_time(len(w.decoding),
                                 sum(r.prompt_len + len(r.times) for r in w.decoding))
      # Slowed while a prefill runs or a request is on its way here (on CPU the prefill and
      # transfer threads' host work competes with the loop's).
      if (prefill_busy_until > now or w.transfers or w.arrived
          or (profile.transfer_waits_for_decode and w.transfer_free > now)):
        step *= profile.contention["decode"]
      end = now + jitter(step)
      still = []
      for request in w.decoding:
        request.times.append(end)
        if len(request.times) >= request.output_len:
          w.pool.release(request)
          remaining -= 1
        else:
          still.append(request)
      w.decoding, w.free, w.busy_until = still, end, end
    else:  # one prefill step: the oldest request plus others of its length bucket
      arrived = [r for r in prefill_queue if r.arrival <= now]
      bucket = bucket_of(arrived[0].prompt_len)
      chosen = [arrived[0]]
      backlog -= 1
      for request in arrived[1:]:
        if len(chosen) == profile.prefill_batch or backlog == 0:
          break
        if bucket_of(request.prompt_len) == bucket:
          chosen.append(request)
          backlog -= 1
      for request in chosen:
        prefill_queue.remove(request)
        request.prefill_start = now
      step = profile.prefill(len(chosen), bucket)
      if any(w.busy_until > now or w.decoding for w in workers):
        # On shared cores a prefill slows with the decode side's load: a base factor plus one
        # per decoding sequence (their streaming and bookkeeping run on the same host).
        step *= (profile.contention["prefill"] + profile.contention.get("prefill_per_seq", 0.0)
                 * sum(len(w.decoding) for w in workers))
      end = now + jitter(step)
      prefill_free[index] = end
      prefill_busy_until = max(prefill_busy_until, end)
      for request in chosen:
        request.times.append(end + profile.read_lag_s)
        if request.output_len == 1:
          backlog += 1
          remaining -= 1
        else:
          target = max(workers, key=lambda w: w.free_pages())
          target.promised += _pages(request.prompt_len + 1, profile.page_size)
          # The KV leaves once the worker has read the first token.
          target.transfers.append((end + profile.read_lag_s, request, bucket))
  pool = _Pool(profile)
  pool.stalls = sum(w.pool.stalls for w in workers)
  return _result(requests, pool)


def simulate(profile: StepProfile, prompt_lens, output_lens, arrivals, *,
             num_prefill_workers: int = 1, num_decode_workers: int = 1) -> SimResult:
  if profile.mode == "colocated":
    return simulate_colocated(profile, prompt_lens, output_lens, arrivals)
  if profile.mode == "disagg":
    return simulate_disagg(profile, prompt_lens, output_lens, arrivals,
                           num_prefill_workers=num_prefill_workers,
                           num_decode_workers=num_decode_workers)
  raise ValueError(f"profile mode {profile.mode!r} is not colocated or disagg")
