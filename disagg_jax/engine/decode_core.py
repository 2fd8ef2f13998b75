"""The decode side shared by both serving modes: device state, slots, growth, preemption, emission.

Device state is the page pool and each slot's next input token (`tokens`), both donated through
every step; host state is `DecodeSlots` (pages, page table, positions) and per-slot sampling
settings, uploaded only when they change.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from disagg_jax.engine.sampling import SamplingArrays
from disagg_jax.engine.slots import DecodeSlots
from disagg_jax.engine.state import RequestState
from disagg_jax.engine.steps import ModelSteps


class DecodeCore:
  """One decode batch of `num_slots` rows over a page pool, on the mesh of `steps`."""

  def __init__(self, steps: ModelSteps, *, num_slots: int, num_pages: int, pages_per_seq: int):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.steps = steps
    self.params = None  # set by the engine: the decode mesh's copy of the parameters
    self.slots = DecodeSlots(num_slots, num_pages, steps.page_size, pages_per_seq)
    self.kv_pages = steps.init_pages(num_pages)
    # Committed to the step outputs' sharding, so the first real step does not recompile.
    self.tokens = jax.device_put(jnp.zeros((num_slots,), jnp.int32), steps.replicated)
    self._sampling_rows = [None] * num_slots
    self._sampling = SamplingArrays.from_params(self._sampling_rows, num_slots)
    self._sampling_dirty = False
    self._table_version = -1
    self._table_dev = None

  # ------------------------------------------------------------------ host -> device inputs

  def set_sampling(self, slot: int, request: RequestState | None) -> None:
    self._sampling_rows[slot] = request.sampling if request else None
    self._sampling_dirty = True

  def sampling_arrays(self) -> SamplingArrays:
    if self._sampling_dirty:
      self._sampling = SamplingArrays.from_params(self._sampling_rows, self.slots.num_slots)
      self._sampling_dirty = False
    return self._sampling

  def page_table(self):
    """The page table on device, re-uploaded only after it changed."""
    import jax  # pylint: disable=g-import-not-at-top
    if self._table_version != self.slots.table_version:
      self._table_dev = jax.device_put(self.slots.page_table, self.steps.replicated)
      self._table_version = self.slots.table_version
    return self._table_dev

  # ------------------------------------------------------------------ slot lifecycle

  def occupy(self, request: RequestState, num_tokens: int) -> int:
    slot = self.slots.assign(request, num_tokens)
    self.set_sampling(slot, request)
    return slot

  def release(self, slot: int) -> RequestState:
    request = self.slots.release(slot)
    self.set_sampling(slot, None)
    return request

  def decoding_slots(self) -> list[int]:
    return [int(s) for s in np.flatnonzero(self.slots.positions >= 0)]

  def make_room(self, need_tokens: dict[int, int],
                preempt: Callable[[RequestState], None]) -> None:
    """Grows each slot in `need_tokens` to hold that many tokens, oldest request first; when the
    pool runs dry the youngest request is preempted (released and handed to `preempt`) until
    the others fit. A lone request that cannot grow is preempted too, so this never blocks."""
    order = sorted(need_tokens, key=lambda s: self.slots.requests[s].metrics.arrival)
    for slot in order:
      while self.slots.requests[slot] is not None and not self.slots.grow(slot,
                                                                          need_tokens[slot]):
        victim = self.slots.youngest()
        preempt(self.release(victim))

  # ------------------------------------------------------------------ steps

  def decode(self) -> np.ndarray:
    """Runs one decode step over all slots and returns every slot's token (host int32[B])."""
    self.tokens, self.kv_pages = self.steps.decode(
        self.params, self.kv_pages, self.tokens, self.slots.positions.copy(), self.page_table(),
        self.sampling_arrays())
    return np.asarray(self.tokens)

  def emit_decoded(self, tokens: np.ndarray, slots: list[int],
                   finish: Callable[[RequestState], None]) -> None:
    """Hands each decoding slot its new token; finished requests leave their slot."""
    now = time.perf_counter()
    for slot in slots:
      request = self.slots.requests[slot]
      self.slots.positions[slot] += 1
      if request.emit(int(tokens[slot]), now):
        finish(self.release(slot))
