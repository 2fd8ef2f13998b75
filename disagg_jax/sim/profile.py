"""Step-time tables of an engine configuration: what the simulator replays.

Every step the engine runs has one of a few compiled shapes (disagg_jax/engine/buckets.py), so a
configuration's cost is a small table: the decode step (all slots, fixed shape), the colocated
mixed steps per (chunk batch, chunk length) bucket, the disaggregated prefill steps per (batch,
length) bucket, the KV insert per length bucket and the transfer per length bucket. Prefill and
decode that share a host's cores (the in-process disaggregated engine on CPU) slow each other
down; `contention` holds the measured factors.

`measure(engine)` times the engine's own compiled step functions (the thunks it compiles ahead),
so the table is exactly the code that serves.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import threading
import time
from typing import Any

import jax
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
  # colocated
  chunk_size: int = 0
  chunk_batch: int = 0
  mixed_s: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
  # disaggregated
  prefill_batch: int = 0
  length_buckets: tuple[int, ...] = ()
  prefill_s: dict[tuple[int, int], float] = dataclasses.field(default_factory=dict)
  insert_s: dict[int, float] = dataclasses.field(default_factory=dict)
  transfer_s: dict[int, float] = dataclasses.field(default_factory=dict)
  # step time with the other phase running at the same time / alone (1.0: no interference)
  contention: dict[str, float] = dataclasses.field(
      default_factory=lambda: {"prefill": 1.0, "decode": 1.0})
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    for key in ("mixed_s", "prefill_s"):
      out[key] = [[b, s, t] for (b, s), t in sorted(getattr(self, key).items())]
    for key in ("insert_s", "transfer_s"):
      out[key] = [[s, t] for s, t in sorted(getattr(self, key).items())]
    out["length_buckets"] = list(self.length_buckets)
    return out

  @classmethod
  def from_json(cls, data: dict) -> "StepProfile":
    data = dict(data)
    try:
      for key in ("mixed_s", "prefill_s"):
        data[key] = {(int(b), int(s)): float(t) for b, s, t in data.get(key, [])}
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

  # ------------------------------------------------------------------ lookups used by the sim

  def decode_time(self, active: int, context_tokens: int) -> float:
    return (self.decode_s + self.decode_per_seq_s * active
            + self.decode_per_token_s * context_tokens)

  def mixed(self, num_chunks: int, longest: int) -> float:
    chunk_batches = buckets.batch_buckets(self.chunk_batch)
    chunk_lens = buckets.length_buckets(self.chunk_size, page_size=1, smallest=16)
    return self.mixed_s[(buckets.pick(num_chunks, chunk_batches),
                         buckets.pick(longest, chunk_lens))]

  def prefill(self, batch: int, bucket: int) -> float:
    return self.prefill_s[(buckets.pick(batch, buckets.batch_buckets(self.prefill_batch)),
                           bucket)]


def _median_time(thunk, block, iters: int) -> float:
  thunk()
  block()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    thunk()
    block()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _while_running(background, foreground, block_bg, block_fg, iters: int) -> float:
  """Median foreground step time while `background` runs back to back on another thread."""
  stop = threading.Event()

  def loop():
    while not stop.is_set():
      background()
      block_bg()

  thread = threading.Thread(target=loop, daemon=True)
  thread.start()
  try:
    time.sleep(0.05)
    return _median_time(foreground, block_fg, iters)
  finally:
    stop.set()
    thread.join()


def measure(engine, iters: int = 5, contention_bucket: int | None = None) -> StepProfile:
  """Times every compiled step of an idle `Engine` (no requests in flight)."""
  core = engine.core
  config = engine.config
  block_decode = lambda: jax.block_until_ready((core.tokens, core.kv_pages))
  decode = lambda: core.decode([])
  profile = StepProfile(mode=engine.mode, page_size=config.page_size,
                        decode_batch=config.decode_batch,
                        num_pages=core.slots.allocator.num_pages - 1,
                        max_seq_len=engine.limits.max_seq_len,
                        decode_s=_median_time(decode, block_decode, iters),
                        meta={"date": time.strftime("%Y-%m-%d %H:%M"),
                              "device": jax.devices()[0].device_kind,
                              "num_devices": engine.num_devices, "iters": iters})
  if engine.mode == "colocated":
    scheduler = engine.scheduler
    profile.chunk_size, profile.chunk_batch = config.chunk_size, config.chunk_batch
    for bc in scheduler.chunk_batches:
      for c in scheduler.chunk_lens:
        profile.mixed_s[(bc, c)] = _median_time(
            lambda bc=bc, c=c: scheduler._run_mixed([], [], bc, c), block_decode, iters)  # pylint: disable=protected-access
    return profile

  prefill = engine.prefill
  profile.prefill_batch = config.prefill_batch
  profile.length_buckets = tuple(prefill.length_buckets)
  extracted = {}
  for s in prefill.length_buckets:
    for b in prefill.batch_buckets:
      def run(b=b, s=s):
        _, kv = prefill._prefill(np.zeros((b, s), np.int32), np.ones(b, np.int32), [None] * b)  # pylint: disable=protected-access
        extracted[s] = prefill.extract(kv, np.int32(0))
      profile.prefill_s[(b, s)] = _median_time(run, lambda: jax.block_until_ready(extracted),
                                               iters)
  loop = engine.decode_loop
  for s in prefill.length_buckets:
    moved = {}

    def transfer(s=s):
      moved[s] = engine.plan.transfer(extracted[s])
    profile.transfer_s[s] = _median_time(transfer, lambda: jax.block_until_ready(moved), iters)
    profile.insert_s[s] = _median_time(lambda s=s: loop._insert_dummy(moved[s], s), block_decode,  # pylint: disable=protected-access
                                       iters)
  # Interference: each phase's step while the other runs back to back. The prefill step used is
  # a single request of `contention_bucket` tokens (default: the middle length bucket).
  bucket = contention_bucket or prefill.length_buckets[len(prefill.length_buckets) // 2]
  bucket = buckets.pick(bucket, prefill.length_buckets)
  background = {}

  def prefill_one():
    _, kv = prefill._prefill(np.zeros((1, bucket), np.int32), np.ones(1, np.int32), [None])  # pylint: disable=protected-access
    background["kv"] = kv
  block_prefill = lambda: jax.block_until_ready(background)
  decode_busy = _while_running(prefill_one, decode, block_prefill, block_decode, iters * 4)
  prefill_alone = _median_time(prefill_one, block_prefill, iters)
  prefill_busy = _while_running(decode, prefill_one, block_decode, block_prefill, iters)
  profile.contention = {"decode": max(decode_busy / profile.decode_s, 1.0),
                        "prefill": max(prefill_busy / prefill_alone, 1.0)}
  profile.meta["contention_bucket"] = bucket
  return profile
