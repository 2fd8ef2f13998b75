"""Prefix caching bookkeeping: page names, the caching allocator, and the pool under a random load."""

import collections
import dataclasses

import numpy as np
import pytest

from disagg_jax.kv.allocator import OutOfPagesError
from disagg_jax.kv.prefix_cache import CachingAllocator, page_hashes
from disagg_jax.sched import policy
from disagg_jax.sched.pool import SlotPool


def test_page_names_are_a_chain_over_full_pages():
  a = list(range(40))
  names = page_hashes(a, 16)
  assert len(names) == 2  # the last 8 tokens fill no page
  assert page_hashes(a[:32] + [999] * 8, 16) == names
  b = list(a)
  b[20] = -5  # differs in page 1: page 0 keeps its name, page 1 (and all after) do not
  other = page_hashes(b + list(range(100, 116)), 16)
  assert other[0] == names[0] and other[1] != names[1]
  assert page_hashes(a, 16, salt=b"another model")[0] != names[0]
  assert page_hashes(a + list(range(8)), 16, start=names[:1]) == page_hashes(a + list(range(8)),
                                                                             16)


def test_cached_pages_are_shared_parked_and_evicted_least_recently_used():
  alloc = CachingAllocator(6, 4, first_page=1)  # pages 1..5
  first = alloc.allocate(3)
  for page, name in zip(first, (b"a", b"b", b"c")):
    assert alloc.register(page, name)
  assert not alloc.register(first[0], b"z")  # a page has one name
  assert alloc.match([b"a", b"b", b"x", b"c"]) == first[:2]
  alloc.acquire(first[:2])  # a second sequence shares a and b
  assert alloc.refs(first[0]) == 2 and alloc.num_free == 2
  alloc.free(first)  # the first sequence ends: c is parked, a and b stay referenced
  assert alloc.num_free == 3 and alloc.match([b"c"]) == [first[2]]
  alloc.free(first[:2])  # parked in order: c, a, b
  assert alloc.num_free == 5 and alloc.num_cached == 3
  alloc.check()
  alloc.acquire([first[0]])  # a leaves the parked set (LRU: c, b)
  assert alloc.num_free == 4 and alloc.parked_among(first) == 2
  new = alloc.allocate(3)  # two free pages, then c is evicted
  assert first[2] in new and alloc.match([b"c"]) == [] and alloc.evictions == 1
  assert alloc.match([b"a", b"b"]) == first[:2]
  with pytest.raises(OutOfPagesError):
    alloc.allocate(2)
  with pytest.raises(ValueError, match="not cached"):
    alloc.acquire([new[0]])
  alloc.free(new + [first[0]])
  with pytest.raises(ValueError, match="double free"):
    alloc.free([first[0]])
  alloc.check()
  assert alloc.num_free == 5


@dataclasses.dataclass(eq=False)
class _Req:
  """A request as the policies see it, with tokens (prefix caching)."""
  request_id: str
  arrival: float
  prompt: list
  max_out: int
  output: list = dataclasses.field(default_factory=list)
  num_computed: int = 0
  finish_reason: str | None = None
  cached_tokens: int | None = None
  page_names: list = dataclasses.field(default_factory=list)
  compute: list = None

  def __post_init__(self):
    self.compute = list(self.prompt)

  @property
  def num_to_compute(self):
    return len(self.compute)

  def restart(self):
    self.num_computed = 0
    self.compute = self.prompt + self.output

  def all_tokens(self):
    return self.prompt + self.output


@pytest.mark.parametrize("num_shards", [1, 2])
def test_random_load_with_aborts_and_preemption_keeps_the_pool_consistent(num_shards):
  """Thousands of requests sharing prefixes (a few system prompts, repeated prompts, prompts
  that are prefixes of others) through the colocated policy on a pool small enough to preempt,
  1% of the running ones aborted per step: after every step no page is lost, held twice, both
  free and cached, or evicted while referenced (`SlotPool.check`); at the end every page is
  free or parked, and cached prefixes were reused."""
  rng = np.random.default_rng(0)
  ps = 4
  pool = SlotPool(8, 16 * num_shards, ps, num_shards=num_shards, reserved=1,
                  prefix_caching=True)
  rules = policy.ColocatedPolicy(chunk_size=8, max_chunks_per_shard=2)
  systems = [list(rng.integers(0, 50, n)) for n in (8, 13, 21)]
  seen = []
  waiting = collections.deque()
  made = finished = aborted = preempted = hits = 0
  rows = []
  step = 0
  while made < 3000 or waiting or pool.occupied():
    step += 1
    for _ in range(rng.poisson(1.2) if made < 3000 else 0):
      kind = rng.integers(4)
      if kind == 0 and seen:  # a repeated prompt
        prompt = list(seen[rng.integers(len(seen))])
      elif kind == 1 and seen:  # a prefix of an earlier one
        earlier = seen[rng.integers(len(seen))]
        prompt = earlier[:rng.integers(1, len(earlier) + 1)]
      else:  # a system prompt and a fresh tail
        prompt = systems[rng.integers(3)] + list(rng.integers(0, 50, rng.integers(1, 20)))
      seen.append(prompt)
      waiting.append(_Req(str(made), step + rng.random(), prompt, int(rng.integers(1, 40))))
      made += 1
    # Aborts: a running request leaves its slot outside a step.
    for slot in pool.occupied():
      if rng.random() < 0.01:
        rules.forget(slot)
        pool.release(slot)
        aborted += 1
    plan = rules.schedule(pool, waiting)
    preempted += len(plan.preempted)
    hits += sum(pool.requests[s].cached_tokens > 0 for s in plan.admitted
                if pool.requests[s] is not None)
    pool.check()
    # This step's commit, then the previous step's tokens (one step ahead, as the engine).
    new_rows = rules.commit(pool, plan) if plan.runs else []
    for slot, request in rows:
      if pool.requests[slot] is request and request.finish_reason is None:
        request.output.append(int(rng.integers(0, 50)))
        if len(request.output) >= request.max_out:
          request.finish_reason = "length"
          pool.release(slot)
          finished += 1
    rows = new_rows
    pool.check()
    assert step < 100_000
  assert finished + aborted == made
  assert preempted > 50 and aborted > 50 and hits > 500
  assert pool.num_free == pool.capacity and not any(pool.held)
  assert sum(a.num_cached for a in pool.allocators) > 0
  assert sum(a.evictions for a in pool.allocators) > 0
