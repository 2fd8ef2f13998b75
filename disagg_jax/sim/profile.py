"""Step-time tables of an engine configuration: what the simulator replays.

Every step the engine runs has one of a few compiled shapes (disagg_jax/engine/buckets.py), so a
configuration's cost is a small table: the decode step (all slots, fixed shape), the colocated
mixed steps per (chunk batch, chunk length) bucket, the disaggregated prefill steps per (batch,
length) bucket, the KV insert per length bucket and the transfer per length bucket. Prefill and
decode that share a host's cores (the in-process disaggregated engine on CPU) slow each other
down; `contention` holds the factors.

This module is the table alone (its JSON form and the lookups the simulator makes). Measuring one
on a running engine is `sim.timing.measure`; fitting it to served runs (the decode cadence while
serving, the contention factors) is `sim.contention.fit_served`, with the runs from
`bench.calibration`. Tables for hardware that
is not here come from the roofline model, `sim.analytic`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from disagg_jax.engine import buckets


@dataclasses.dataclass
class StepProfile:
  """Median seconds per step of one engine configuration."""
  mode: str
  page_size: int
  decode_batch: int
  num_pages: int  # usable pages of the decode pool
  max_seq_len: int
  decode_s: float  # the decode step (CPU engine: fixed shape, so independent of the batch)
  # Analytic tables (accelerators, where paged attention reads only live pages): a decode step
  # costs decode_s + decode_per_seq_s x active sequences + decode_per_token_s x their tokens.
  decode_per_seq_s: float = 0.0
  decode_per_token_s: float = 0.0
  # Measured tables (CPU): the decode loop's cadence per step shape (rows over all dp rows,
  # page-table width in pages), and `decode_ref`, the shape that gives decode_s. A decode step of
  # another shape costs decode_time() plus the table's difference to the reference
  # (`decode_shape_s`). Empty for analytic tables, whose steps read only live pages.
  decode_shapes_s: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
  decode_ref: tuple[int, ...] = ()
  # Data-parallel rows of the decode mesh (colocated: its one mesh): the slots and the page
  # pool split into dp shards, and the step tables' rows count all dp rows (a step computes the
  # same rows on every shard).
  dp: int = 1
  # colocated
  chunk_size: int = 0
  chunk_batch: int = 0
  mixed_s: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
  # the same per (chunk rows, chunk length, page-table width in pages); mixed_s holds the widest
  mixed_widths_s: dict[tuple[int, int, int], float] = dataclasses.field(default_factory=dict)
  # disaggregated
  prefill_batch: int = 0
  # Data-parallel rows of the prefill mesh: its batches are multiples of it (one prompt or more
  # per row), up to prefill_batch rounded up to one.
  prefill_dp: int = 1
  length_buckets: tuple[int, ...] = ()
  prefill_s: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
  insert_s: dict[int, float] = dataclasses.field(default_factory=dict)
  transfer_s: dict[int, float] = dataclasses.field(default_factory=dict)
  # How the KV moves (`--config.engine.transfer`): in this many layer groups, each leaving as
  # its layers are computed (1: the whole request after its prefill), each copy paying
  # transfer_latency_s besides its bytes. transfer_s is per length bucket of KV; a request
  # moves only its prompt's pages (`transfer_time`).
  transfer_groups: int = 1
  transfer_latency_s: float = 0.0
  # step time with the other phase running at the same time / alone (1.0: no interference);
  # "prefill_per_seq" adds to the prefill factor per decoding sequence
  contention: dict[str, float] = dataclasses.field(
      default_factory=lambda: {"prefill": 1.0, "decode": 1.0})
  # CPU devices run one computation at a time: a KV copy onto the decode devices queues behind
  # the decode step running there, and the loops read a step's tokens once the next step has run.
  # GPUs and TPUs copy beside compute and dispatch asynchronously.
  transfer_waits_for_decode: bool = False
  # The loops dispatch step N+1 before reading step N's tokens (`--config.engine.run_ahead`);
  # False: each step's tokens are read before the next step is decided.
  run_ahead: bool = True
  # In-process disaggregated engine: tokens of prefilled KV that may wait on the decode devices
  # (`--config.engine.staging_tokens`, resolved); 0: the longest length bucket (tables saved
  # before the setting existed). A cluster's workers have no such budget.
  staging_tokens: int = 0
  # A step's end to its tokens reaching the requests (colocated: every token, since the loop
  # reads a step's tokens after dispatching the next; disaggregated: the first token, the
  # prefill worker's host work around the step).
  read_lag_s: float = 0.0
  # Waking from idle (CPU hosts): [idle seconds, extra seconds to the first token] of lone
  # requests sent after the engine sat idle that long, against sent back to back. An engine
  # that sleeps between requests pays it (threads and the device's thread pool wake slowly);
  # empty: none.
  wake_s: list = dataclasses.field(default_factory=list)
  # Step-to-step variability: measured decode gaps over their median (empty: deterministic). The
  # simulator scales each step by a draw from these.
  jitter: list = dataclasses.field(default_factory=list)
  # The engine reuses cached prompt pages (`--config.engine.prefix_caching`; the simulator's
  # pool then caches pages by content like the engine's, for requests given with their tokens).
  prefix_caching: bool = False
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def describe(self) -> list[str]:
    """The table as text lines, milliseconds per step (what launch/profile.py prints)."""
    ms = lambda seconds: f"{seconds * 1e3:.2f}"
    lines = [f"{self.mode} step times (ms, medians): decode {ms(self.decode_s)}"
             + (f" at rows x width {self.decode_ref}" if self.decode_ref else "")]

    def table(title, entries, header, name):
      """entries: {numeric key: seconds}, listed in key order, each key shown by name(key)."""
      if entries:
        lines.append(f"{title}  ({header}: ms)")
        lines.extend(f"  {name(key)}: {ms(entries[key])}" for key in sorted(entries))
    table("decode", self.decode_shapes_s, "rows x page-table width",
          lambda k: f"{k[0]} rows x {k[1]} pages")
    table("mixed", self.mixed_widths_s, "chunk rows x chunk length x width",
          lambda k: f"{k[0]} chunks x {k[1]} tokens x {k[2]} pages")
    table("prefill", self.prefill_s, "batch x length bucket",
          lambda k: f"batch {k[0]} x {k[1]} tokens")
    table("insert", self.insert_s, "length bucket", lambda k: f"{k} tokens")
    table("transfer", self.transfer_s, "length bucket", lambda k: f"{k} tokens")
    extras = [f"contention {self.contention}"] if self.mode == "disagg" else []
    extras.append(f"read lag {ms(self.read_lag_s)} ms")
    if self.wake_s:
      extras.append("wake " + ", ".join(f"{ms(extra)} ms after {idle:g} s idle"
                                        for idle, extra in self.wake_s))
    lines.append("; ".join(extras))
    return lines

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    for key in ("mixed_s", "prefill_s", "decode_shapes_s", "mixed_widths_s"):
      out[key] = [[*shape, t] for shape, t in sorted(getattr(self, key).items())]
    out["decode_ref"] = list(self.decode_ref)
    for key in ("insert_s", "transfer_s"):
      out[key] = [[s, t] for s, t in sorted(getattr(self, key).items())]
    out["length_buckets"] = list(self.length_buckets)
    return out

  @classmethod
  def from_json(cls, data: dict) -> "StepProfile":
    data = dict(data)
    try:
      for key in ("mixed_s", "prefill_s", "decode_shapes_s", "mixed_widths_s"):
        data[key] = {tuple(int(n) for n in row[:-1]): float(row[-1])
                     for row in data.get(key, [])}
      data["decode_ref"] = tuple(int(n) for n in data.get("decode_ref", ()))
      for key in ("insert_s", "transfer_s"):
        data[key] = {int(s): float(t) for s, t in data.get(key, [])}
      data["length_buckets"] = tuple(data.get("length_buckets", ()))
      return cls(**data)
    except (TypeError, ValueError) as e:
      raise ValueError(f"not a step profile ({e})") from None

  def save(self, path: str) -> None:
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=1)

  @classmethod
  def load(cls, path: str) -> "StepProfile":
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"--profile={path}: cannot read a step profile ({e})") from None
    return cls.from_json(data)

  def restricted(self, *, chunk_size: int | None = None, chunk_batch: int | None = None,
                 prefill_batch: int | None = None) -> "StepProfile":
    """The table of the same engine with smaller step limits. Its step shapes are a subset of
    this one's (the buckets are powers of two), so nothing needs measuring again; a limit that
    is not one of this profile's buckets raises ValueError."""
    changes: dict[str, Any] = {}
    if self.mode == "colocated":
      chunk_size = chunk_size or self.chunk_size
      chunk_batch = chunk_batch or self.chunk_batch
      lens = buckets.chunk_lens(self.chunk_size)
      if chunk_size not in lens:
        raise ValueError(f"chunk_size={chunk_size} is not one of this profile's chunk buckets "
                         f"{lens}")
      if chunk_batch not in buckets.chunk_rows(self.chunk_batch):
        raise ValueError(f"chunk_batch={chunk_batch} is not one of this profile's batch buckets "
                         f"{buckets.chunk_rows(self.chunk_batch)}")
      rows = buckets.chunk_rows(chunk_batch, self.dp)[-1] * self.dp  # all dp rows
      changes.update(chunk_size=chunk_size, chunk_batch=chunk_batch,
                     mixed_s={(b, c): t for (b, c), t in self.mixed_s.items()
                              if b <= rows and c <= chunk_size},
                     mixed_widths_s={(b, c, w): t for (b, c, w), t
                                     in self.mixed_widths_s.items()
                                     if b <= rows and c <= chunk_size})
    elif prefill_batch is not None:
      if prefill_batch not in buckets.batch_buckets(self.prefill_batch):
        raise ValueError(f"prefill_batch={prefill_batch} is not one of this profile's batch "
                         f"buckets {buckets.batch_buckets(self.prefill_batch)}")
      top = buckets.batch_buckets(prefill_batch, self.prefill_dp)[-1]
      changes.update(prefill_batch=prefill_batch,
                     prefill_s={(b, l): t for (b, l), t in self.prefill_s.items() if b <= top})
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------ lookups used by the sim

  def decode_time(self, active: int, context_tokens: int,
                  shape: tuple[int, int] | None = None) -> float:
    """A decode step over `active` sequences holding `context_tokens` tokens; `shape`: its
    (rows, page-table width) as `decode_shape` gives it, where the profile has a shape table."""
    return (self.decode_s + self.decode_per_seq_s * active
            + self.decode_per_token_s * context_tokens + self.decode_shape_s(shape))

  def decode_shape(self, pool, decoding) -> tuple[int, int] | None:
    """The (rows over all dp rows, page-table width) of the engine's decode step over the
    `decoding` slots of `pool` (a `sched.pool.SlotPool` of `dp` shards); None without a shape
    table."""
    if not self.decode_shapes_s or not decoding:
      return None
    per_shard = sorted({r // self.dp for r, _ in self.decode_shapes_s})
    widths = sorted({w for _, w in self.decode_shapes_s})
    return pool.decode_rows(decoding, per_shard) * self.dp, pool.table_width(widths)

  def decode_shape_s(self, shape: tuple[int, int] | None) -> float:
    """What a decode step of `shape` costs beyond one of the reference shape (0 without)."""
    if shape is None or not self.decode_shapes_s:
      return 0.0
    reference = self.decode_shapes_s[tuple(self.decode_ref)]
    return self.decode_shapes_s.get(shape, reference) - reference

  def wake(self, idle: float) -> float:
    """Extra seconds before a request that finds the engine idle for `idle` seconds gets
    served: the measured `wake_s` interpolated (nothing before the shortest idle measured,
    the longest's beyond it)."""
    if not self.wake_s or idle <= 0:
      return 0.0
    points = sorted(self.wake_s)
    return float(np.interp(idle, [0.0] + [p[0] for p in points],
                           [0.0] + [max(p[1], 0.0) for p in points]))

  def chunk_rows(self) -> tuple[int, ...]:
    """The mixed steps' chunk rows per shard (the engine's buckets for chunk_batch over dp)."""
    return buckets.chunk_rows(self.chunk_batch, self.dp)

  def mixed(self, chunks_per_shard: int, longest: int, pool=None) -> float:
    """A mixed step whose fullest shard has `chunks_per_shard` chunks, the longest `longest`
    tokens (the engine pads every shard to the same rows); with `pool` (the slots after the
    step's admissions), at the page-table width it needs where the profile has the widths,
    else at the widest."""
    key = (buckets.pick(chunks_per_shard, self.chunk_rows()) * self.dp,
           buckets.pick(longest, buckets.chunk_lens(self.chunk_size)))
    if pool is None or not self.mixed_widths_s:
      return self.mixed_s[key]
    widths = sorted({w for _, _, w in self.mixed_widths_s})
    return self.mixed_widths_s[(*key, pool.table_width(widths))]

  def transfer_time(self, tokens: int) -> float:
    """Seconds to move `tokens` tokens of KV (whole pages) in one copy: transfer_s interpolated
    linearly over its length buckets (extrapolated from the two shortest below the first)."""
    lengths = sorted(self.transfer_s)
    times = [self.transfer_s[n] for n in lengths]
    if len(lengths) == 1:
      return times[0] * tokens / lengths[0]
    if tokens < lengths[0]:
      slope = (times[1] - times[0]) / (lengths[1] - lengths[0])
      return max(times[0] - slope * (lengths[0] - tokens), 0.0)
    return float(np.interp(tokens, lengths, times))

  def transfer_groups_time(self, tokens: int) -> float:
    """One layer group's copy of a `tokens`-token request: its share of the bytes plus the
    fixed cost of a copy."""
    whole = self.transfer_time(tokens)
    return (self.transfer_latency_s
            + max(whole - self.transfer_latency_s, 0.0) / max(self.transfer_groups, 1))

  def prefill_batches(self) -> tuple[int, ...]:
    """The prefill steps' batch buckets (the engine's: multiples of the prefill mesh's dp)."""
    return buckets.batch_buckets(self.prefill_batch, self.prefill_dp)

  def prefill(self, batch: int, bucket: int) -> float:
    return self.prefill_s[(buckets.pick(batch, self.prefill_batches()),
                           bucket)]
