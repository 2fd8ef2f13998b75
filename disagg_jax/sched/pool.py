"""Decode slots over a page pool: what the scheduling policies read and change.

`SlotPool` is the protocol's one implementation of the bookkeeping that both the engine and the
simulator need: which request holds which slot, how many pages each slot holds, each slot's next
decode position, and the free pages of each shard (a mesh with dp rows splits the slots and the
pool into dp shards; a slot takes pages only from its own shard). It counts pages; the engine's
`engine.slots.DecodeSlots` subclasses it to hand out real page ids and keep the page table the
device steps read. The simulator uses `SlotPool` itself.

Policies (`sched.policy`) decide; they change a pool only through `assign`, `grow`, `release`
and `positions`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from disagg_jax.kv.pages import pages_for


class SlotPool:
  """`num_slots` decode rows over `num_shards` blocks of `pages_per_shard` pages; `reserved`
  pages of each block are never handed out (the engine's scratch page)."""

  def __init__(self, num_slots: int, pages_per_shard: int, page_size: int, *,
               num_shards: int = 1, reserved: int = 0):
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
    self._free = [self.shard_capacity] * num_shards
    self.occupancy_version = 0  # bumped whenever a slot changes hands

  # ------------------------------------------------------------------ queries

  def shard_free(self, shard: int) -> int:
    return self._free[shard]

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
    return [int(s) for s in np.flatnonzero(self.positions >= 0)]

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

  # ------------------------------------------------------------------ changes

  def assign(self, request, num_tokens: int, shard: int) -> int:
    """Gives `request` the first free slot of `shard`, with pages for `num_tokens` tokens."""
    slot = next((s for s in self.shard_slots(shard) if self.requests[s] is None), None)
    if slot is None:
      raise RuntimeError(f"shard {shard} has no free slot")
    if self.pages_needed(slot, num_tokens) > self.shard_free(shard):
      raise RuntimeError(f"shard {shard} has {self.shard_free(shard)} free pages; "
                         f"{num_tokens} tokens need {pages_for(num_tokens, self.page_size)}")
    self.requests[slot] = request
    self.occupancy_version += 1
    self.grow(slot, num_tokens)
    return slot

  def grow(self, slot: int, num_tokens: int) -> bool:
    """Adds pages so that `slot` holds `num_tokens` tokens; False if its shard cannot."""
    need = self.pages_needed(slot, num_tokens)
    if need == 0:
      return True
    if need > self.shard_free(self.shard_of(slot)):
      return False
    self._take(slot, need)
    self.held[slot] += need
    return True

  def release(self, slot: int):
    """Frees the slot and its pages; returns the request that held it."""
    request = self.requests[slot]
    self._give_back(slot)
    self.held[slot] = 0
    self.requests[slot] = None
    self.positions[slot] = -1
    self.occupancy_version += 1
    return request

  # ------------------------------------------------------------------ page accounting (hooks)

  def _take(self, slot: int, num_pages: int) -> None:
    self._free[self.shard_of(slot)] -= num_pages

  def _give_back(self, slot: int) -> None:
    self._free[self.shard_of(slot)] += self.held[slot]


def pick(n: int, sizes) -> int:
  """The first of the ascending `sizes` that is at least `n` (the shape bucket covering n)."""
  for size in sizes:
    if n <= size:
      return size
  raise ValueError(f"{n} exceeds the largest bucket {sizes[-1]}")
