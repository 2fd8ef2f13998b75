"""The decode batch's host-side bookkeeping: which request holds which slot and which pages.

Plain Python and NumPy, outside jit. The arrays `page_table` and `positions` are what the device
steps read. On a mesh with dp rows the slots and the page pool split into that many shards
(`disagg_jax.kv.layout`): slot s belongs to shard s // (num_slots / dp) and takes its pages only
from that shard's block [shard * pages_per_shard, (shard + 1) * pages_per_shard), whose first page
is the shard's scratch page. Every unused page-table entry holds 0, which each shard reads as its
own scratch page, so every page id a kernel sees is in bounds.
"""

from __future__ import annotations

import numpy as np

from disagg_jax.engine.state import RequestState
from disagg_jax.kv.allocator import PageAllocator

SCRATCH_PAGE = 0


def pages_for(num_tokens: int, page_size: int) -> int:
  """Pages that hold `num_tokens` tokens."""
  return -(-num_tokens // page_size)


class DecodeSlots:
  """`num_slots` rows of the decode batch over a page pool of `num_shards` blocks of
  `pages_per_shard` pages (each incl. its scratch page)."""

  def __init__(self, num_slots: int, pages_per_shard: int, page_size: int, pages_per_seq: int,
               num_shards: int = 1):
    if num_slots % num_shards:
      raise ValueError(f"decode_batch={num_slots} must split evenly over dp={num_shards} "
                       "(--config.engine.decode_batch)")
    self.num_slots = num_slots
    self.num_shards = num_shards
    self.slots_per_shard = num_slots // num_shards
    self.page_size = page_size
    self.pages_per_seq = pages_per_seq
    self.pages_per_shard = pages_per_shard
    self.num_pages = num_shards * pages_per_shard  # the whole pool; also the "skip" page id
    self.allocators = [PageAllocator((k + 1) * pages_per_shard, page_size,
                                     first_page=k * pages_per_shard + SCRATCH_PAGE + 1)
                       for k in range(num_shards)]
    self.requests: list[RequestState | None] = [None] * num_slots
    self.pages: list[list[int]] = [[] for _ in range(num_slots)]
    self.page_table = np.full((num_slots, pages_per_seq), SCRATCH_PAGE, np.int32)
    # Position of the token each slot feeds next; -1 when the slot is not decoding.
    self.positions = np.full(num_slots, -1, np.int32)
    self.table_version = 0  # bumped on every page-table change, so callers re-upload lazily

  # ------------------------------------------------------------------ queries

  @property
  def num_free(self) -> int:
    return sum(a.num_free for a in self.allocators)

  @property
  def capacity(self) -> int:
    """Usable pages of the whole pool."""
    return sum(a.capacity for a in self.allocators)

  def shard_of(self, slot: int) -> int:
    return slot // self.slots_per_shard

  def shard_slots(self, shard: int) -> range:
    return range(shard * self.slots_per_shard, (shard + 1) * self.slots_per_shard)

  def occupied(self) -> list[int]:
    return [s for s, r in enumerate(self.requests) if r is not None]

  def max_pages_in_use(self) -> int:
    """The most pages any occupied slot holds (what a step's page-table width must cover)."""
    return max((len(p) for p in self.pages), default=0)

  def pages_needed(self, slot: int, num_tokens: int) -> int:
    """Pages to add so that slot can hold `num_tokens` tokens."""
    return max(0, pages_for(num_tokens, self.page_size) - len(self.pages[slot]))

  def _admission_shard(self, num_tokens: int) -> int | None:
    """The shard to admit a `num_tokens` sequence into: one with a free slot and the pages, keeping
    one page back per decoding slot of the shard (so that admissions do not force preemptions
    next step); the one with the most free pages. None if no shard can."""
    need = pages_for(num_tokens, self.page_size)
    best = None
    for shard, allocator in enumerate(self.allocators):
      slots = self.shard_slots(shard)
      if all(self.requests[s] is not None for s in slots):
        continue
      reserve = sum(1 for s in slots if self.positions[s] >= 0)
      if allocator.num_free >= need + reserve and (
          best is None or allocator.num_free > self.allocators[best].num_free):
        best = shard
    return best

  def can_admit(self, num_tokens: int) -> bool:
    """A free slot and pages for `num_tokens` tokens (see `_admission_shard`)."""
    return self._admission_shard(num_tokens) is not None

  # ------------------------------------------------------------------ changes

  def assign(self, request: RequestState, num_tokens: int) -> int:
    """Gives `request` a free slot with pages for `num_tokens` tokens; returns the slot."""
    shard = self._admission_shard(num_tokens)
    if shard is None:
      raise RuntimeError("no free slot with pages (check can_admit first)")
    slot = next(s for s in self.shard_slots(shard) if self.requests[s] is None)
    self.requests[slot] = request
    self.grow(slot, num_tokens)
    return slot

  def grow(self, slot: int, num_tokens: int) -> bool:
    """Allocates pages so `slot` can hold `num_tokens` tokens; False if its shard cannot."""
    need = self.pages_needed(slot, num_tokens)
    if need == 0:
      return True
    allocator = self.allocators[self.shard_of(slot)]
    if not allocator.can_allocate(need):
      return False
    start = len(self.pages[slot])
    new = allocator.allocate(need)
    self.pages[slot].extend(new)
    self.page_table[slot, start:start + need] = new
    self.table_version += 1
    return True

  def release(self, slot: int) -> RequestState | None:
    """Frees the slot and its pages; returns the request that held it."""
    request = self.requests[slot]
    self.allocators[self.shard_of(slot)].free(self.pages[slot])
    self.pages[slot] = []
    self.requests[slot] = None
    self.page_table[slot] = SCRATCH_PAGE
    self.positions[slot] = -1
    self.table_version += 1
    return request

  def youngest(self, shard: int) -> int | None:
    """The occupied slot of `shard` whose request arrived last (the one to preempt)."""
    slots = [s for s in self.shard_slots(shard) if self.requests[s] is not None]
    if not slots:
      return None
    return max(slots, key=lambda s: self.requests[s].metrics.arrival)

  def prompt_page_ids(self, slot: int, num_tokens: int, bucket: int) -> np.ndarray:
    """int32[bucket // page_size]: the slot's pages for a `num_tokens` prefix written from a
    `bucket`-long buffer; blocks past the prefix get num_pages (dropped by the write)."""
    ids = np.full(bucket // self.page_size, self.num_pages, np.int32)
    used = pages_for(num_tokens, self.page_size)
    ids[:used] = self.pages[slot][:used]
    return ids
