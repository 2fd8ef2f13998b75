"""The decode batch's host-side bookkeeping: which request holds which slot and which pages.

Plain Python and NumPy, outside jit. The arrays `page_table` and `positions` are what the device
steps read; page 0 of the pool is a scratch page that every unused page-table entry points at.
"""

from __future__ import annotations

import numpy as np

from disagg_jax.engine.state import RequestState
from disagg_jax.kv.allocator import PageAllocator

SCRATCH_PAGE = 0


class DecodeSlots:
  """`num_slots` rows of the decode batch over a page pool of `num_pages` pages."""

  def __init__(self, num_slots: int, num_pages: int, page_size: int, pages_per_seq: int):
    self.num_slots = num_slots
    self.page_size = page_size
    self.pages_per_seq = pages_per_seq
    self.allocator = PageAllocator(num_pages, page_size, first_page=SCRATCH_PAGE + 1)
    self.requests: list[RequestState | None] = [None] * num_slots
    self.pages: list[list[int]] = [[] for _ in range(num_slots)]
    self.page_table = np.full((num_slots, pages_per_seq), SCRATCH_PAGE, np.int32)
    # Position of the token each slot feeds next; -1 when the slot is not decoding.
    self.positions = np.full(num_slots, -1, np.int32)
    self.table_version = 0  # bumped on every page-table change, so callers re-upload lazily

  # ------------------------------------------------------------------ queries

  def free_slot(self) -> int | None:
    for slot, request in enumerate(self.requests):
      if request is None:
        return slot
    return None

  def occupied(self) -> list[int]:
    return [s for s, r in enumerate(self.requests) if r is not None]

  def pages_needed(self, slot: int, num_tokens: int) -> int:
    """Pages to add so that slot can hold `num_tokens` tokens."""
    return max(0, -(-num_tokens // self.page_size) - len(self.pages[slot]))

  def can_admit(self, num_tokens: int, reserve: int = 0) -> bool:
    """A free slot and pages for `num_tokens` tokens, keeping `reserve` pages back."""
    need = -(-num_tokens // self.page_size)
    return self.free_slot() is not None and self.allocator.num_free >= need + reserve

  # ------------------------------------------------------------------ changes

  def assign(self, request: RequestState, num_tokens: int) -> int:
    """Gives `request` a free slot with pages for `num_tokens` tokens; returns the slot."""
    slot = self.free_slot()
    if slot is None:
      raise RuntimeError("no free slot (check can_admit first)")
    self.requests[slot] = request
    self.grow(slot, num_tokens)
    return slot

  def grow(self, slot: int, num_tokens: int) -> bool:
    """Allocates pages so `slot` can hold `num_tokens` tokens; False if the pool cannot."""
    need = self.pages_needed(slot, num_tokens)
    if need == 0:
      return True
    if not self.allocator.can_allocate(need):
      return False
    start = len(self.pages[slot])
    new = self.allocator.allocate(need)
    self.pages[slot].extend(new)
    self.page_table[slot, start:start + need] = new
    self.table_version += 1
    return True

  def release(self, slot: int) -> RequestState | None:
    """Frees the slot and its pages; returns the request that held it."""
    request = self.requests[slot]
    self.allocator.free(self.pages[slot])
    self.pages[slot] = []
    self.requests[slot] = None
    self.page_table[slot] = SCRATCH_PAGE
    self.positions[slot] = -1
    self.table_version += 1
    return request

  def youngest(self, exclude: int | None = None) -> int | None:
    """The occupied slot whose request arrived last (the one to preempt)."""
    slots = [s for s in self.occupied() if s != exclude]
    if not slots:
      return None
    return max(slots, key=lambda s: self.requests[s].metrics.arrival)

  def prompt_page_ids(self, slot: int, num_tokens: int, bucket: int) -> np.ndarray:
    """int32[bucket // page_size]: the slot's pages for a `num_tokens` prefix written from a
    `bucket`-long buffer; blocks past the prefix get num_pages (dropped by the write)."""
    ids = np.full(bucket // self.page_size, self.allocator.num_pages, np.int32)
    used = -(-num_tokens // self.page_size)
    ids[:used] = self.pages[slot][:used]
    return ids
