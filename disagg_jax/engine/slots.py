"""The decode batch's host-side bookkeeping with real page ids: `DecodeSlots`.

`sched.pool.SlotPool` counts slots and pages for the scheduling policies; `DecodeSlots` adds
which pages: one `PageAllocator` per dp shard, each slot's page list, and the `page_table` the
device steps read. Plain Python and NumPy, outside jit. On a mesh with dp rows the slots and the
page pool split into that many shards (`disagg_jax.kv.layout`): slot s belongs to shard
s // (num_slots / dp) and takes its pages only from that shard's block
[shard * pages_per_shard, (shard + 1) * pages_per_shard), whose first page is the shard's scratch
page. Every unused page-table entry holds 0, which each shard reads as its own scratch page, so
every page id a kernel sees is in bounds.
"""

from __future__ import annotations

import numpy as np

from disagg_jax.kv.pages import pages_for
from disagg_jax.sched.pool import SlotPool

SCRATCH_PAGE = 0

__all__ = ["DecodeSlots", "SCRATCH_PAGE", "pages_for"]


class DecodeSlots(SlotPool):
  """`num_slots` rows of the decode batch over a page pool of `num_shards` blocks of
  `pages_per_shard` pages (each incl. its scratch page)."""

  def __init__(self, num_slots: int, pages_per_shard: int, page_size: int, pages_per_seq: int,
               num_shards: int = 1, prefix_caching: bool = False, salt: bytes = b""):
    self.pages_per_seq = pages_per_seq
    self.num_pages = num_shards * pages_per_shard  # the whole pool; also the "skip" page id
    self.page_table = np.full((num_slots, pages_per_seq), SCRATCH_PAGE, np.int32)
    self.table_version = 0  # bumped on every page-table change, so callers re-upload lazily
    super().__init__(num_slots, pages_per_shard, page_size, num_shards=num_shards,
                     reserved=SCRATCH_PAGE + 1, prefix_caching=prefix_caching, salt=salt)

  def _pages_changed(self, slot: int) -> None:
    pages = self.pages[slot]
    self.page_table[slot] = SCRATCH_PAGE
    self.page_table[slot, :len(pages)] = pages
    self.table_version += 1

  def prompt_page_ids(self, slot: int, num_tokens: int, bucket: int) -> np.ndarray:
    """int32[bucket // page_size]: the slot's pages for a `num_tokens` prefix written from a
    `bucket`-long buffer; blocks past the prefix get num_pages (dropped by the write)."""
    ids = np.full(bucket // self.page_size, self.num_pages, np.int32)
    used = pages_for(num_tokens, self.page_size)
    ids[:used] = self.pages[slot][:used]
    return ids
