"""The scheduling policies, as thread-free decisions over a `SlotPool` (vLLM's `schedule()` style).

The engine's threads and the simulator both call these: the engine's schedulers take their lock,
ask the policy, then dispatch device steps and collect their tokens; the simulator asks the same
objects under a simulated clock with a page-counting pool. Nothing here touches a device, a
thread or a clock.

A request is anything with `arrival` (seconds; the oldest is served first and preempted last),
`num_to_compute` (tokens whose KV the next prefill must compute: the prompt, or prompt plus
output after a preemption), `num_computed` (of those, already in the pool; chunked prefill),
`finish_reason` (None while running) and `restart()` (after preemption: recompute everything);
with prefix caching also `cached_tokens` (None until first admitted, then how many of its prompt
tokens were found cached), `page_names` and `all_tokens()` (see `sched.pool.SlotPool`).

Decisions:
- admission (`admission`): a request enters a shard with a free slot and the pages for its
  first tokens, keeping one page per decoding slot of the shard in reserve so admissions do not
  force preemptions on the next step; of the shards that can, the one holding the longest cached
  prefix of it (prefix caching), then the one with the most free pages. Cached pages are shared,
  not allocated; only the tokens after them are computed.
- growth and preemption (`make_room`): each sequence gets the pages for its next tokens, oldest
  first; when a shard runs dry its youngest request is preempted (released; the caller requeues
  it) until the others fit.
- colocated steps (`ColocatedPolicy.schedule`): FIFO admission, then one chunk of at most
  `chunk_size` prompt tokens for each of the oldest prefilling slots (at most
  `max_chunks_per_shard` per dp shard), then a decode token for every decoding slot.
- prefill batches (`prefill_batch`): the oldest waiting request plus others of its length bucket,
  up to the batch limit of that bucket, as far as the staging budget allows.
- inserts (`insert_arrived`): arrived KV enters the decode batch in FIFO order under the
  admission rule.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Any, Callable, Iterable, Protocol, Sequence

from disagg_jax.kv.pages import pages_for
from disagg_jax.sched.pool import SlotPool


class Request(Protocol):
  arrival: float
  num_computed: int
  finish_reason: str | None

  @property
  def num_to_compute(self) -> int: ...

  def restart(self) -> None: ...


# ---------------------------------------------------------------------- shared decisions


def admission(pool: SlotPool, request, tokens_after: Callable[[int], int]):
  """Where to admit `request` (see the module docstring): (shard, its cached pages there), or
  None. `tokens_after(cached_tokens)`: the tokens its slot must hold once admitted, given how
  many are found cached."""
  best, best_key = None, None
  for shard in range(pool.num_shards):
    slots = pool.shard_slots(shard)
    if all(pool.requests[s] is not None for s in slots):
      continue
    cached = pool.cached(shard, request)
    tokens = tokens_after(len(cached) * pool.page_size)
    need = (max(0, pages_for(tokens, pool.page_size) - len(cached))
            + pool.cost(shard, cached))
    free = pool.shard_free(shard)
    reserve = sum(1 for s in slots if pool.positions[s] >= 0)
    key = (len(cached), free)
    if free >= need + reserve and (best is None or key > best_key):
      best, best_key = (shard, cached), key
  return best


def admission_shard(pool: SlotPool, num_tokens: int) -> int | None:
  """The shard to admit a `num_tokens` sequence into, nothing cached, or None."""
  choice = admission(pool, None, lambda _: num_tokens)
  return None if choice is None else choice[0]


def victim(pool: SlotPool, shard: int) -> int | None:
  """The slot to preempt in `shard`: the one whose request arrived last."""
  slots = [s for s in pool.shard_slots(shard) if pool.requests[s] is not None]
  if not slots:
    return None
  return max(slots, key=lambda s: pool.requests[s].arrival)


def make_room(pool: SlotPool, need_tokens: dict[int, int]) -> list:
  """Grows each slot of `need_tokens` to hold that many tokens, oldest request first, preempting
  the youngest request of a shard that runs dry (a lone request that cannot grow is preempted
  too, so this never blocks). Returns the preempted requests, released from their slots, in
  the order they were preempted; the caller restarts and requeues them."""
  preempted = []
  for slot in sorted(need_tokens, key=lambda s: pool.requests[s].arrival):
    while pool.requests[slot] is not None and not pool.grow(slot, need_tokens[slot]):
      preempted.append(pool.release(victim(pool, pool.shard_of(slot))))
  return preempted


def advance(pool: SlotPool, decoding: Iterable[int]) -> None:
  """After a decode step was dispatched: each decoding slot feeds its next position."""
  for slot in decoding:
    pool.positions[slot] += 1


def collect(pool: SlotPool, rows: Sequence[tuple[int, Any]],
            emit: Callable[[int, Any], bool]) -> list:
  """Hands a finished step's rows their tokens: `emit(slot, request)` records one and says
  whether the request is now finished; finished requests leave their slot. Rows whose request
  left the slot since the step was dispatched (finished a step earlier, aborted, preempted) are
  skipped: a preempted request regenerates the same token. Returns the finished requests."""
  finished = []
  for slot, request in rows:
    if pool.requests[slot] is not request or request.finish_reason is not None:
      continue
    if emit(slot, request):
      finished.append(pool.release(slot))
  return finished


# ---------------------------------------------------------------------- colocated


@dataclasses.dataclass
class ColocatedStep:
  """One colocated step's plan. `chunks`: (slot, start, length) prompt chunks, oldest first;
  `decode`: the decoding slots; `admitted`: slots that took a waiting request this step;
  `preempted`: requests that lost their slot (already restarted and back at the queue's head)."""
  admitted: list[int]
  chunks: list[tuple[int, int, int]]
  decode: list[int]
  preempted: list

  @property
  def runs(self) -> bool:
    return bool(self.chunks or self.decode)

  def describe(self, pool: SlotPool) -> tuple:
    """The decisions by request id, for traces: (admitted (id, slot), chunks (id, start,
    length), decoding ids, preempted ids)."""
    rid = lambda slot: pool.requests[slot].request_id
    return (tuple((rid(s), s) for s in self.admitted if pool.requests[s] is not None),
            tuple((rid(s), start, n) for s, start, n in self.chunks),
            tuple(rid(s) for s in self.decode),
            tuple(r.request_id for r in self.preempted))


class ColocatedPolicy:
  """Continuous batching with chunked prefill on one pool."""

  def __init__(self, *, chunk_size: int, max_chunks_per_shard: int):
    self.chunk_size = chunk_size
    self.max_chunks_per_shard = max_chunks_per_shard
    self.prefilling: list[int] = []  # slots whose prompt is still being computed, FIFO

  def schedule(self, pool: SlotPool, waiting: collections.deque) -> ColocatedStep:
    """Admits from the head of `waiting` (mutated), picks the chunks, grows every sequence for
    this step and preempts what does not fit."""
    admitted = []
    while waiting:
      request = waiting[0]
      first = lambda cached, r=request: cached + min(self.chunk_size, r.num_to_compute - cached)
      choice = admission(pool, request, first)
      if choice is None:
        break
      shard, cached = choice
      waiting.popleft()
      cached_tokens = len(cached) * pool.page_size
      slot = pool.assign(request, first(cached_tokens), shard, cached)
      request.num_computed = cached_tokens
      if request.cached_tokens is None:
        request.cached_tokens = cached_tokens
      self.prefilling.append(slot)
      admitted.append(slot)
    chunks = []
    taken = [0] * pool.num_shards
    for slot in self.prefilling:
      shard = pool.shard_of(slot)
      if taken[shard] == self.max_chunks_per_shard:
        continue
      taken[shard] += 1
      request = pool.requests[slot]
      n = min(self.chunk_size, request.num_to_compute - request.num_computed)
      chunks.append((slot, request.num_computed, n))
    decoding = pool.decoding()
    need = {s: int(pool.positions[s]) + 1 for s in decoding}
    need.update({slot: start + n for slot, start, n in chunks})
    preempted = make_room(pool, need)
    if preempted:
      self.prefilling = [s for s in self.prefilling if pool.requests[s] is not None]
      for request in preempted:
        request.restart()
        waiting.appendleft(request)
    chunks = [c for c in chunks if pool.requests[c[0]] is not None]
    decoding = [s for s in decoding if pool.requests[s] is not None]
    return ColocatedStep(admitted, chunks, decoding, preempted)

  def commit(self, pool: SlotPool, step: ColocatedStep) -> list[tuple[int, Any]]:
    """After the step was dispatched: chunk progress and decode positions advance. Returns the
    (slot, request) rows whose next token the step produces: the decoding slots, then the slots
    whose last prompt chunk it computed (they decode from the next step on)."""
    rows = [(s, pool.requests[s]) for s in step.decode]
    advance(pool, step.decode)
    for slot, start, n in step.chunks:
      request = pool.requests[slot]
      request.num_computed = start + n
      pool.register(slot, request.num_computed, from_token=start)
      if request.num_computed == request.num_to_compute:
        self.prefilling.remove(slot)
        pool.positions[slot] = request.num_computed
        rows.append((slot, request))
    return rows

  def forget(self, slot: int) -> None:
    """The slot's request left outside a step (aborted)."""
    if slot in self.prefilling:
      self.prefilling.remove(slot)


# ---------------------------------------------------------------------- disaggregated


class Budget(Protocol):
  def reserve(self, request, tokens: int) -> bool: ...

  def release(self, request) -> None: ...


class TokenBudget:
  """Tokens of prefilled KV allowed to wait for a decode slot (the staging budget), counted.
  Each request holds its reservation in `request.staged`, so releasing twice is harmless."""

  def __init__(self, tokens: int):
    self.capacity = tokens
    self.free = tokens

  def reserve(self, request, tokens: int) -> bool:
    if self.free < tokens:
      return False
    self.free -= tokens
    request.staged += tokens
    return True

  def release(self, request) -> None:
    self.free += request.staged
    request.staged = 0


def prefill_batch(waiting: collections.deque, *, bucket_of: Callable[[int], int],
                  max_batch_for: Callable[[int], int], staging: Budget):
  """The next prefill batch: the oldest waiting request plus others of its length bucket, up to
  `max_batch_for(bucket)`, each reserving its bucket of `staging`. Removes the chosen requests
  from `waiting` and returns (requests, bucket); None when the head's reservation fails (the
  caller waits for the decode side to take some KV)."""
  if not waiting:
    return None
  head = waiting[0]
  bucket = bucket_of(head.num_to_compute)
  if not staging.reserve(head, bucket):
    return None
  chosen = [head]
  limit = max_batch_for(bucket)
  for request in itertools.islice(waiting, 1, None):
    if len(chosen) == limit:
      break
    if bucket_of(request.num_to_compute) == bucket and staging.reserve(request, bucket):
      chosen.append(request)
  for request in chosen:
    waiting.remove(request)
  return chosen, bucket


def insert_arrived(pool: SlotPool, arrived: collections.deque,
                   request_of: Callable[[Any], Any] = lambda item: item) -> list[tuple[Any, int]]:
  """Arrived KV into free slots, FIFO, while the head fits (pages for its prefix and its first
  decoded token). Pops the inserted items from `arrived`; returns (item, slot) pairs. Each slot
  decodes from the position after the prefix; with prefix caching its full prompt pages are
  cached from now on (their insert is dispatched before any later step)."""
  inserted = []
  while arrived:
    request = request_of(arrived[0])
    computed = request.num_to_compute
    shard = admission_shard(pool, computed + 1)
    if shard is None:
      break
    item = arrived.popleft()
    slot = pool.assign(request, computed + 1, shard)
    pool.positions[slot] = computed
    pool.register(slot, computed)
    inserted.append((item, slot))
  return inserted


def route_local(pool: SlotPool, request, max_tail: int) -> bool:
  """Disaggregated, with prefix caching: whether `request` is prefilled where its decode pool
  already holds a prefix of it (conditional disaggregation): some shard holds cached pages of
  it and the tokens after them fit `max_tail` (one chunk). Otherwise the prefill mesh computes
  it all. The cache may change before admission; the request is then computed from whatever is
  cached then, still correctly."""
  best = max((len(pool.cached(k, request)) for k in range(pool.num_shards)), default=0)
  return best > 0 and request.num_to_compute - best * pool.page_size <= max_tail


def describe_decode(pool: SlotPool, inserted, decoding, preempted) -> tuple:
  """A decode-loop iteration's decisions by request id, for traces: (inserted (id, slot),
  decoding ids, preempted ids). `inserted` items hold their request first."""
  rid = lambda slot: pool.requests[slot].request_id
  return (tuple((item[0].request_id, slot) for item, slot in inserted),
          tuple(rid(s) for s in decoding), tuple(r.request_id for r in preempted))


def decode_step(pool: SlotPool) -> tuple[list[int], list]:
  """A decode-only step: every decoding slot grows by one token (preempting as `make_room`).
  Returns (the decoding slots, the preempted requests, released but not yet restarted)."""
  decoding = pool.decoding()
  preempted = make_room(pool, {s: int(pool.positions[s]) + 1 for s in decoding})
  return [s for s in decoding if pool.requests[s] is not None], preempted
