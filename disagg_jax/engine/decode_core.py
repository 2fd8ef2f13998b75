"""The decode side shared by both serving modes: device state, slots, growth, preemption, emission.

Device state is the page pool and each slot's next input token (`tokens`), both donated through
every step and changed only by this class's step methods (`dispatch_decode`, `mixed`, `insert`); host state is `DecodeSlots` (pages, page table, positions) and per-slot sampling
settings, uploaded only when they change. Each step reads a page table only as wide as the
longest sequence in the batch needs (a width bucket, `buckets.width_buckets`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from disagg_jax.engine import buckets
from disagg_jax.engine.request import HostLogprobs
from disagg_jax.engine.sampling import SamplingArrays, history_row
from disagg_jax.engine.slots import DecodeSlots
from disagg_jax.engine.state import RequestState
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.sched import policy


class DecodeCore:
  """One decode batch of `num_slots` rows over a page pool, on the mesh of `steps`."""

  def __init__(self, steps: ModelSteps, *, num_slots: int, pages_per_shard: int,
               max_seq_len: int, prefix_caching: bool = False, salt: bytes = b""):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.steps = steps
    self.params = None  # set by the engine: the decode mesh's copy of the parameters
    ps = steps.page_size
    self.widths = buckets.width_buckets(max_seq_len, ps)
    self.slots = DecodeSlots(num_slots, pages_per_shard, ps, self.widths[-1],
                             num_shards=steps.dp, prefix_caching=prefix_caching, salt=salt)
    self.kv_pages = steps.init_pages(self.slots.num_pages)
    # Decode steps compute a prefix of each dp row's slots: the rows they index, per prefix length.
    per_shard = self.slots.slots_per_shard
    self.row_buckets = buckets.decode_rows(per_shard)
    self._rows = {r: jax.device_put(np.array([k * per_shard + j for k in range(steps.dp)
                                              for j in range(r)], np.int32), steps.rows)
                  for r in self.row_buckets}
    # Committed to the step outputs' sharding, so the first real step does not recompile.
    self.tokens = jax.device_put(jnp.zeros((num_slots,), jnp.int32), steps.rows)
    # The last step's log-probabilities of each slot's token (sampling.LogprobArrays).
    self.logprobs = None
    # Each slot's penalty history int32[num_slots, V] (sampling.history_row), set when a
    # penalized request takes the slot and updated by every step; `_history_of[slot]` is the
    # (request, its preemption count) it was last set for.
    self.history = jax.device_put(jnp.zeros((num_slots, steps.cfg.vocab_size), jnp.int32),
                                  steps.rows)
    self._history_of: list = [None] * num_slots
    self._history_version = None
    self._sampling = None
    self._sampling_version = None
    self._table_key = None
    self._table_dev = None

  # ------------------------------------------------------------------ host -> device inputs

  def sampling_arrays(self) -> SamplingArrays:
    """Per-slot sampling settings on device, re-uploaded only after a slot changed hands."""
    import jax  # pylint: disable=g-import-not-at-top
    if self._sampling_version != self.slots.occupancy_version:
      host = SamplingArrays.from_params([r.sampling if r is not None else None
                                         for r in self.slots.requests], self.slots.num_slots)
      self._sampling = jax.device_put(host, self.steps.rows)
      self._sampling_version = self.slots.occupancy_version
    return self._sampling

  def sync_history(self) -> None:
    """Sets the penalty history of every slot a penalized request took since the last step
    (its prompt, and what it generated before, e.g. the first token made by the prefill mesh or
    the tokens before a preemption)."""
    if self._history_version == self.slots.occupancy_version:
      return
    self._history_version = self.slots.occupancy_version
    for slot, request in enumerate(self.slots.requests):
      # A request back after a preemption is a new occupant: it may have generated more since.
      occupant = request and (request, request.metrics.preemptions)
      if occupant == self._history_of[slot]:
        continue
      self._history_of[slot] = occupant
      if request is not None and request.sampling.penalized:
        row = history_row(request.prompt_ids, request.output_ids, self.steps.cfg.vocab_size)
        self.history = self.steps.set_history(self.history, np.int32(slot), row)

  def positions(self):
    """This step's positions on device (an explicit transfer costs less than letting the jitted
    call convert a NumPy argument)."""
    import jax  # pylint: disable=g-import-not-at-top
    # A copy: on CPU, device_put may alias the NumPy buffer, which the host mutates next.
    return jax.device_put(self.slots.positions.copy(), self.steps.rows)

  def width(self) -> int:
    """The page-table width (pages) this step needs: the bucket of the longest sequence."""
    return self.slots.table_width(self.widths)

  def page_table(self, width: int | None = None):
    """The page table's first `width` columns on device, re-uploaded only after it changed."""
    import jax  # pylint: disable=g-import-not-at-top
    width = width or self.width()
    key = (self.slots.table_version, width)
    if self._table_key != key:
      self._table_dev = jax.device_put(self.slots.page_table[:, :width].copy(), self.steps.rows)
      self._table_key = key
    return self._table_dev

  # ------------------------------------------------------------------ slot lifecycle

  def release(self, slot: int) -> RequestState:
    return self.slots.release(slot)

  def decoding_slots(self) -> list[int]:
    return self.slots.decoding()

  # ------------------------------------------------------------------ steps

  def decode_rows(self, decoding: list[int]) -> int:
    """Rows per dp row the next decode step must compute: the bucket covering every decoding
    slot's index within its dp row."""
    return self.slots.decode_rows(decoding, self.row_buckets)

  def dispatch_decode(self, decoding: list[int]) -> None:
    """Dispatches one decode step over the slots' prefix holding `decoding` (asynchronously)."""
    self.sync_history()
    self.tokens, self.kv_pages, self.logprobs, self.history = self.steps.decode(
        self.params, self.kv_pages, self.tokens, self.positions(), self.page_table(),
        self.sampling_arrays(), self._rows[self.decode_rows(decoding)], self.history)

  def decode(self, decoding: list[int]) -> "InFlight":
    """Dispatches one decode step over `decoding`, advances their positions and returns the
    step's handle."""
    self.dispatch_decode(decoding)
    rows = [(s, self.slots.requests[s]) for s in decoding]
    policy.advance(self.slots, decoding)
    return InFlight(self.tokens, rows, self.logprobs)

  def mixed(self, table, chunk_inputs, precompile: bool = False) -> None:
    """Dispatches (or with `precompile` only compiles) the colocated mixed step: prompt chunks
    (`chunk_inputs`, on device) beside a decode token for every decoding slot."""
    if not precompile:
      self.sync_history()
    args = (self.params, self.kv_pages, self.tokens, self.positions(), table,
            self.sampling_arrays(), *chunk_inputs, self.history)
    if precompile:
      self.steps.mixed.precompile(*args)
    else:
      self.tokens, self.kv_pages, self.logprobs, self.history = self.steps.mixed(*args)

  def insert(self, pieces, page_ids, slot: int, token: int) -> None:
    """Writes a request's arrived KV `pieces` (`transfer.pieces.Piece`, each a page block of a
    layer group) into its pages `page_ids` (the request's, from its first page) and sets the
    slot's next input token (slot num_slots: none)."""
    for piece in pieces:
      self.insert_block(piece, page_ids[piece.first_page:piece.first_page + piece.num_pages])
    self.tokens = self.steps.set_token(self.tokens, np.int32(slot), np.int32(token))

  def insert_block(self, piece, page_ids, precompile: bool = False) -> None:
    """Writes one piece into the pages `page_ids` (num_pages: dropped); with `precompile`,
    only compiles that shape."""
    start, stop = piece.layers
    args = (self.kv_pages[start:stop], piece.arrays, np.asarray(page_ids, np.int32))
    if precompile:
      self.steps.insert_block.precompile(*args)
      return
    written = self.steps.insert_block(*args)
    self.kv_pages = self.kv_pages[:start] + list(written) + self.kv_pages[stop:]

  def precompile_decode(self, width: int, rows: int) -> None:
    """Compiles the decode step for page tables `width` pages wide and `rows` rows per dp row
    (without running it; safe to call from several threads at once)."""
    self.steps.decode.precompile(self.params, self.kv_pages, self.tokens, self.positions(),
                                 self.table_for_compiling(width), self.sampling_arrays(),
                                 self._rows[rows], self.history)

  def history_shape(self):
    """(description, thunk compiling it) of the step that sets a slot's penalty history."""
    row = np.zeros(self.steps.cfg.vocab_size, np.int32)
    return ("set history", lambda: self.steps.set_history.precompile(self.history, np.int32(0),
                                                                     row))

  def table_for_compiling(self, width: int):
    """A `width`-page table on device shaped and sharded as the steps take it (not cached)."""
    import jax  # pylint: disable=g-import-not-at-top
    return jax.device_put(np.zeros((self.slots.num_slots, width), np.int32), self.steps.rows)

  def collect(self, step: "InFlight", finish: Callable[[RequestState], None]) -> None:
    """Reads a dispatched step's tokens (waiting for it) and hands each row its token
    (`policy.collect`); finished requests leave their slot and go to `finish`."""
    tokens = np.asarray(step.tokens)
    logprobs = step.host_logprobs()
    now = time.perf_counter()

    def emit(slot: int, request: RequestState) -> bool:
      if request.metrics.first_token is None:
        request.metrics.first_token = now
      logprob = logprobs and logprobs.row(slot, request.sampling)
      return request.emit(int(tokens[slot]), now, logprob)
    for request in policy.collect(self.slots, step.rows, emit):
      finish(request)


@dataclasses.dataclass
class InFlight:
  """A dispatched step: its output tokens (device int32[B]), the (slot, request) rows whose
  next token they hold, and the tokens' log-probabilities (device `LogprobArrays`)."""
  tokens: object
  rows: list
  logprobs: object = None

  def host_logprobs(self) -> HostLogprobs | None:
    """The log-probabilities on the host, read only when some row asked for them."""
    return HostLogprobs.read(self.logprobs, [r.sampling for _, r in self.rows])
