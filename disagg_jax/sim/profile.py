"""Step-time tables of an engine configuration: what the simulator replays.

Every step the engine runs has one of a few compiled shapes (disagg_jax/engine/buckets.py), so a
configuration's cost is a small table: the decode step (all slots, fixed shape), the colocated
mixed steps per (chunk batch, chunk length) bucket, the disaggregated prefill steps per (batch,
length) bucket, the KV insert per length bucket and the transfer per length bucket. Prefill and
decode that share a host's cores (the in-process disaggregated engine on CPU) slow each other
down; `contention` holds the measured factors.

`measure(engine)` times the engine's own compiled step functions (the thunks it compiles ahead),
so the table is exactly the code that serves. Decode and mixed steps are timed back to back, as
the engine's loops dispatch them one ahead; prefill steps one at a time, as the prefill worker
waits for each step's first tokens.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
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
  # CPU devices run one computation at a time: a KV copy onto the decode devices queues behind
  # the decode step running there, and the loops read a step's tokens once the next step has run.
  # GPUs and TPUs copy beside compute and dispatch asynchronously.
  transfer_waits_for_decode: bool = False
  read_lag_s: float = 0.0  # colocated: a step's end to its tokens reaching the requests
  # Step-to-step variability: measured decode gaps over their median (empty: deterministic). The
  # simulator scales each step by a draw from these.
  jitter: list = dataclasses.field(default_factory=list)
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


def _pipelined_time(thunk, block, iters: int) -> float:
  """Seconds per step when `iters` steps are dispatched back to back and waited for once, as the
  engine's decode loops run them (step N+1 is dispatched before step N's tokens are read, so the
  host's bookkeeping hides behind the device's work)."""
  thunk()
  block()
  times = []
  for _ in range(3):
    start = time.perf_counter()
    for _ in range(iters):
      thunk()
    block()
    times.append((time.perf_counter() - start) / iters)
  return statistics.median(times)


def _decode_cadence(engine, num_requests: int, new_tokens: int, during=None):
  """Median gap between decode tokens (each request's first gap excluded) of `num_requests`
  short-prompt requests served by the running engine, `new_tokens` tokens each (capped by the
  engine's max_seq_len). With `during`, it runs on another thread while waves of such requests
  keep the decode loop busy, and its result is returned too. Returns (median gap, during's
  result, all gaps)."""
  import threading  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  prompt = 8
  sampling = SamplingParams(max_new_tokens=max(min(new_tokens,
                                                   engine.limits.max_seq_len - prompt), 3),
                            ignore_eos=True)
  result, done = {}, threading.Event()
  if during is not None:
    def run():
      time.sleep(0.2)  # let the decode loop fill up
      result["value"] = during()
      done.set()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
  gaps = []
  while True:
    streams = [engine.add_request([10 + i % 50] * prompt, sampling) for i in range(num_requests)]
    for stream in streams:
      gaps += list(np.diff(stream.result().metrics.token_times)[1:])
    if during is None or done.is_set():
      break
  return float(np.median(gaps)), result.get("value"), gaps


def _read_lag(engine, profile: StepProfile, iters: int) -> float:
  """How long after its step ends the colocated loop hands out a token: a lone request's TTFT
  minus its one mixed step (median of `iters` probes)."""
  from disagg_jax.engine.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  chunk = min(profile.chunk_size, 64, profile.max_seq_len - 3)
  lags = []
  for i in range(iters):
    stream = engine.add_request([10 + i] * chunk, SamplingParams(max_new_tokens=2,
                                                                   ignore_eos=True))
    m = stream.result().metrics
    lags.append(m.token_times[0] - m.arrival - profile.mixed(1, chunk))
  return max(float(np.median(lags)), 0.0)


def measure(engine, iters: int = 5, contention_bucket: int | None = None) -> StepProfile:
  """The step-time table of an idle `Engine` (no requests in flight): its compiled steps timed
  directly, and the decode loop's cadence from a few probe requests it serves."""
  core = engine.core
  config = engine.config
  block_decode = lambda: jax.block_until_ready((core.tokens, core.kv_pages))
  profile = StepProfile(mode=engine.mode, page_size=config.page_size,
                        decode_batch=config.decode_batch,
                        num_pages=core.slots.allocator.num_pages - 1,
                        max_seq_len=engine.limits.max_seq_len,
                        decode_s=0.0,
                        meta={"date": time.strftime("%Y-%m-%d %H:%M"),
                              "device": jax.devices()[0].device_kind,
                              "num_devices": engine.num_devices, "iters": iters})
  # CPU devices run one computation at a time: a dispatch returns once the previous one has run,
  # and a copy onto the decode devices waits for their decode step.
  profile.transfer_waits_for_decode = jax.devices()[0].platform == "cpu"
  # The decode step as the engine's own loop achieves it (dispatch, sampling, streaming and all),
  # from the token gaps of short requests: with 2 and with a full batch of them, so the host's
  # per-sequence work gives decode_per_seq_s.
  few, full = min(2, config.decode_batch), config.decode_batch
  few_s, _, gaps = _decode_cadence(engine, few, 20 * iters + 8)
  gaps = np.asarray(gaps)
  profile.jitter = [float(q) for q in np.quantile(gaps / np.median(gaps), np.linspace(0, 1, 41))]
  full_s, _, _ = _decode_cadence(engine, full, 6 * iters + 8)
  profile.decode_per_seq_s = max(full_s - few_s, 0.0) / max(full - few, 1)
  profile.decode_s = few_s - few * profile.decode_per_seq_s
  if engine.mode == "colocated":
    scheduler = engine.scheduler
    profile.chunk_size, profile.chunk_batch = config.chunk_size, config.chunk_batch
    for bc in scheduler.chunk_batches:
      for c in scheduler.chunk_lens:
        profile.mixed_s[(bc, c)] = _pipelined_time(
            lambda bc=bc, c=c: scheduler._run_mixed([], [], bc, c), block_decode, iters)  # pylint: disable=protected-access
    profile.read_lag_s = _read_lag(engine, profile, iters)
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
  # Interference: a prefill step of one `contention_bucket`-token request (default: the middle
  # length bucket) run back to back while the engine decodes two requests, against alone; and
  # the decode cadence meanwhile against without. (The decode step's device work does not depend
  # on how many slots are live; the host's per-sequence work is decode_per_seq_s.)
  bucket = contention_bucket or prefill.length_buckets[len(prefill.length_buckets) // 2]
  bucket = buckets.pick(bucket, prefill.length_buckets)
  background = {}

  def prefill_one():
    _, kv = prefill._prefill(np.zeros((1, bucket), np.int32), np.ones(1, np.int32), [None])  # pylint: disable=protected-access
    background["kv"] = kv
  block_prefill = lambda: jax.block_until_ready(background)
  prefill_alone = _median_time(prefill_one, block_prefill, iters)
  steps = max(int(0.5 / max(prefill_alone, 1e-3)), 2 * iters)

  def spaced_prefills():
    # As a serving prefill worker sees them: one at a time with idle gaps (a quarter duty
    # cycle), each timed alone; back-to-back prefills would overstate the interference.
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      prefill_one()
      block_prefill()
      times.append(time.perf_counter() - start)
      time.sleep(3 * prefill_alone)
    return statistics.median(times)
  decode_busy, prefill_busy, _ = _decode_cadence(engine, few, int(3.0 / few_s) + 8,
                                                 during=spaced_prefills)
  profile.contention = {"decode": max(decode_busy / few_s, 1.0),
                        "prefill": max(prefill_busy / prefill_alone, 1.0)}
  profile.meta["contention_bucket"] = bucket
  return profile
