"""Decode slots over a page pool: what the scheduling policies read and change.

`SlotPool` is the protocol's one implementation of the bookkeeping that both the engine and the
simulator need: which request holds which slot, which pages each slot holds, each slot's next
decode position, and the free pages of each shard (a mesh with dp rows splits the slots and the
pool into dp shards; a slot takes pages only from its own shard, page ids
[shard * pages_per_shard + reserved, (shard + 1) * pages_per_shard)). Each shard's pages come from
a `kv.prefix_cache.CachingAllocator`; with `prefix_caching`, full pages whose KV is written are
cached by content (`register`, and on `release`) and a request's cached prefix is found with
`cached` and shared on `assign`. The engine's `engine.slots.DecodeSlots` subclasses the pool to
keep the page table the device steps read; the simulator uses `SlotPool` itself.

Policies (`sched.policy`) decide; they change a pool only through `assign`, `grow`, `register`,
`release` and `positions`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from disagg_jax.kv.pages import pages_for
from disagg_jax.kv.prefix_cache import CachingAllocator, page_hashes


class SlotPool:
  """`num_slots` decode rows over `num_shards` blocks of `pages_per_shard` pages; `reserved`
  pages of each block are never handed out (the engine's scratch page). With `prefix_caching`,
  pages are named by `salt` and the tokens up to their end (`kv.prefix_cache.page_hashes`); a
  request then needs `all_tokens()` (its prompt and output so far) and a `page_names` list
  attribute the pool extends."""

  def __init__(self, num_slots: int, pages_per_shard: int, page_size: int, *,
               num_shards: int = 1, reserved: int = 0, prefix_caching: bool = False,
               salt: bytes = b""):
    if num_slots % num_shards:
      raise ValueError(f"decode_batch={num_slots} must split evenly over dp={num_shards} "
                       "(--config.engine.decode_batch)")
    if pages_per_shard <= reserved:
      raise ValueError(f"pages_per_shard={pages_per_shard} must exceed reserved={reserved}")
    self.num_slots = num_slots
    self.num_shards = num_shards
    self.slots_per_shard = num_slots // num_shards
    self.page_size = page_size
    self.pages_per_shard = pages_per_shard
    self.requests: list[Any] = [None] * num_slots
    self.held = [0] * num_slots  # pages each slot holds
    # Position of the token each slot feeds next; -1 when the slot is not decoding.
    self.positions = np.full(num_slots, -1, np.int32)
    self.shard_capacity = pages_per_shard - reserved  # pages a shard can hand out
    self.allocators = [CachingAllocator((k + 1) * pages_per_shard, page_size,
                                        first_page=k * pages_per_shard + reserved)
                       for k in range(num_shards)]
    self.pages: list[list[int]] = [[] for _ in range(num_slots)]
    self.prefix_caching = prefix_caching
    self.salt = salt
    self.occupancy_version = 0  # bumped whenever a slot changes hands

  # ------------------------------------------------------------------ queries

  def shard_free(self, shard: int) -> int:
    """Pages the shard can hand out: free, or cached and unreferenced (evicted when taken)."""
    return self.allocators[shard].num_free

  @property
  def num_free(self) -> int:
    return sum(self.shard_free(k) for k in range(self.num_shards))

  @property
  def capacity(self) -> int:
    """Pages the pool can hand out in all."""
    return self.num_shards * self.shard_capacity

  def shard_of(self, slot: int) -> int:
    return slot // self.slots_per_shard

  def shard_slots(self, shard: int) -> range:
    return range(shard * self.slots_per_shard, (shard + 1) * self.slots_per_shard)

  def occupied(self) -> list[int]:
    return [s for s, r in enumerate(self.requests) if r is not None]

  def decoding(self) -> list[int]:
    """Slots whose request decodes (its prompt is in the pool), in slot order."""
    # A list comprehension: on a few dozen slots numpy's per-call overhead dominates (this runs
    # once per simulated decode step).
    return [s for s, p in enumerate(self.positions.tolist()) if p >= 0]

  def max_pages_in_use(self) -> int:
    """The most pages any occupied slot holds (what a step's page-table width must cover)."""
    return max(self.held, default=0)

  def table_width(self, widths) -> int:
    """The page-table width (pages) a step needs: the first of the ascending `widths` that
    covers the longest sequence in the pool."""
    return pick(max(self.max_pages_in_use(), 1), widths)

  def decode_rows(self, decoding, row_buckets) -> int:
    """Rows per shard a decode step over `decoding` computes: the first of the ascending
    `row_buckets` covering every decoding slot's index within its shard (the slots in use are
    a prefix of each shard: requests take the lowest free slot)."""
    return pick(max(s % self.slots_per_shard for s in decoding) + 1, row_buckets)

  def pages_needed(self, slot: int, num_tokens: int) -> int:
    """Pages to add so that `slot` can hold `num_tokens` tokens."""
    return max(0, pages_for(num_tokens, self.page_size) - self.held[slot])

  def names(self, request, num_pages: int) -> list[bytes]:
    """The names of `request`'s first `num_pages` full pages (fewer if its tokens end before),
    computed once per request and extended as it grows."""
    if len(request.page_names) < num_pages:
      tokens = request.all_tokens()[:num_pages * self.page_size]
      request.page_names = page_hashes(tokens, self.page_size, self.salt, request.page_names)
    return request.page_names[:num_pages]

  def cached(self, shard: int, request) -> list[int]:
    """The cached pages of `shard` holding the longest prefix of `request`'s tokens to compute,
    leaving at least its last token to compute (its logits give the next token); none without
    `prefix_caching`."""
    if not self.prefix_caching or request is None:
      return []
    usable = (request.num_to_compute - 1) // self.page_size
    return self.allocators[shard].match(self.names(request, usable))

  def cost(self, shard: int, cached) -> int:
    """Free pages that taking a reference to `cached` pages uses (the unreferenced ones)."""
    return self.allocators[shard].parked_among(cached)

  # ------------------------------------------------------------------ changes

  def assign(self, request, num_tokens: int, shard: int, cached=()) -> int:
    """Gives `request` the first free slot of `shard`: a reference to its `cached` pages (from
    `cached`: the first pages of its sequence), then new pages up to `num_tokens` tokens."""
    slot = next((s for s in self.shard_slots(shard) if self.requests[s] is None), None)
    if slot is None:
      raise RuntimeError(f"shard {shard} has no free slot")
    need = (max(0, pages_for(num_tokens, self.page_size) - len(cached))
            + self.cost(shard, cached))
    if need > self.shard_free(shard):
      raise RuntimeError(f"shard {shard} has {self.shard_free(shard)} free pages; "
                         f"{num_tokens} tokens need {need}")
    self.requests[slot] = request
    self.occupancy_version += 1
    if cached:
      self.allocators[shard].acquire(cached)
      self.pages[slot] = list(cached)
      self.held[slot] = len(cached)
      self._pages_changed(slot)
    self.grow(slot, num_tokens)
    return slot

  def grow(self, slot: int, num_tokens: int) -> bool:
    """Adds pages so that `slot` holds `num_tokens` tokens; False if its shard cannot."""
    need = self.pages_needed(slot, num_tokens)
    if need == 0:
      return True
    if need > self.shard_free(self.shard_of(slot)):
      return False
    self.pages[slot].extend(self.allocators[self.shard_of(slot)].allocate(need))
    self.held[slot] += need
    self._pages_changed(slot)
    return True

  def register(self, slot: int, num_tokens: int, from_token: int = 0) -> None:
    """With `prefix_caching`: caches the slot's full pages among its first `num_tokens` tokens
    (their KV written, or dispatched to be written before any later step reads it); pages that
    end at or before `from_token` are skipped (registered already)."""
    if not self.prefix_caching:
      return
    allocator = self.allocators[self.shard_of(slot)]
    full = min(num_tokens // self.page_size, self.held[slot])
    first = from_token // self.page_size
    names = self.names(self.requests[slot], full)
    for page, name in zip(self.pages[slot][first:full], names[first:]):
      allocator.register(page, name)

  def written(self, slot: int) -> int:
    """Tokens of the slot's sequence whose KV is written or dispatched: its decode position
    once it decodes, else its computed prompt tokens."""
    position = int(self.positions[slot])
    return position if position >= 0 else self.requests[slot].num_computed

  def release(self, slot: int):
    """Frees the slot and its pages (caching the full ones first, with `prefix_caching`: a
    finished, aborted or preempted sequence's KV stays reusable until evicted); returns the
    request that held it."""
    request = self.requests[slot]
    if self.prefix_caching:
      self.register(slot, self.written(slot))
    self.allocators[self.shard_of(slot)].free(self.pages[slot])
    self.pages[slot] = []
    self._pages_changed(slot)
    self.held[slot] = 0
    self.requests[slot] = None
    self.positions[slot] = -1
    self.occupancy_version += 1
    return request

  def _pages_changed(self, slot: int) -> None:
    """Hook: the slot's page list changed (`DecodeSlots` updates its page table)."""

  def check(self) -> None:
    """Raises AssertionError if slots and allocators disagree (for tests)."""
    for k, allocator in enumerate(self.allocators):
      allocator.check()
      refs = {}
      for s in self.shard_slots(k):
        assert len(self.pages[s]) == self.held[s], f"slot {s}: held != its pages"
        assert self.requests[s] is not None or not self.pages[s], f"free slot {s} holds pages"
        for page in self.pages[s]:
          refs[page] = refs.get(page, 0) + 1
      assert all(allocator.refs(p) == n for p, n in refs.items()), "reference counts drifted"
      assert sum(refs.values()) == sum(allocator.refs(p) for p in refs)


def pick(n: int, sizes) -> int:
  """The first of the ascending `sizes` that is at least `n` (the shape bucket covering n)."""
  for size in sizes:
    if n <= size:
      return size
  raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
