"""Step-time tables of an engine configuration: what the simulator replays.

Every step the engine runs has one of a few compiled shapes (disagg_jax/engine/buckets.py), so a
configuration's cost is a small table: the decode step (all slots, fixed shape), the colocated
mixed steps per (chunk batch, chunk length) bucket, the disaggregated prefill steps per (batch,
length) bucket, the KV insert per length bucket and the transfer per length bucket. Prefill and
decode that share a host's cores (the in-process disaggregated engine on CPU) slow each other
down; `contention` holds the factors, fitted so that the simulator reproduces two short served
runs of the engine (`calibration_run`, `fit_contention`).

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
  # step time with the other phase running at the same time / alone (1.0: no interference);
  # "prefill_per_seq" adds to the prefill factor per decoding sequence
  contention: dict[str, float] = dataclasses.field(
      default_factory=lambda: {"prefill": 1.0, "decode": 1.0})
  # CPU devices run one computation at a time: a KV copy onto the decode devices queues behind
  # the decode step running there, and the loops read a step's tokens once the next step has run.
  # GPUs and TPUs copy beside compute and dispatch asynchronously.
  transfer_waits_for_decode: bool = False
  # A step's end to its tokens reaching the requests (colocated: every token, since the loop
  # reads a step's tokens after dispatching the next; disaggregated: the first token, the
  # prefill worker's host work around the step).
  read_lag_s: float = 0.0
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
      changes.update(chunk_size=chunk_size, chunk_batch=chunk_batch,
                     mixed_s={(b, c): t for (b, c), t in self.mixed_s.items()
                              if b <= chunk_batch and c <= chunk_size})
    elif prefill_batch is not None:
      if prefill_batch not in buckets.batch_buckets(self.prefill_batch):
        raise ValueError(f"prefill_batch={prefill_batch} is not one of this profile's batch "
                         f"buckets {buckets.batch_buckets(self.prefill_batch)}")
      changes.update(prefill_batch=prefill_batch,
                     prefill_s={(b, l): t for (b, l), t in self.prefill_s.items()
                                if b <= prefill_batch})
    return dataclasses.replace(self, **changes)

  # ------------------------------------------------------------------ lookups used by the sim

  def decode_time(self, active: int, context_tokens: int) -> float:
    return (self.decode_s + self.decode_per_seq_s * active
            + self.decode_per_token_s * context_tokens)

  def mixed(self, num_chunks: int, longest: int) -> float:
    chunk_batches = buckets.chunk_rows(self.chunk_batch)
    chunk_lens = buckets.chunk_lens(self.chunk_size)
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
  """How long after its step ends the engine hands out a first token: a lone request's TTFT
  minus its one step alone (colocated: a mixed step; disaggregated: a prefill step), the median
  of 4 x `iters` probes (one at a time; a few alone are noisy, 13-19 ms between profiles)."""
  from disagg_jax.engine.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  if profile.mode == "colocated":
    prompt = min(profile.chunk_size, 64, profile.max_seq_len - 3)
    step = profile.mixed(1, prompt)
  else:
    prompt = min(64, profile.max_seq_len - 3)
    step = profile.prefill(1, buckets.pick(prompt, profile.length_buckets))
  lags = []
  for i in range(4 * iters):
    stream = engine.add_request([10 + i] * prompt, SamplingParams(max_new_tokens=2,
                                                                    ignore_eos=True))
    m = stream.result().metrics
    lags.append(m.token_times[0] - m.arrival - step)
  return max(float(np.median(lags)), 0.0)


def measure(engine, iters: int = 5, contention_bucket: int | None = None,
            calibrate: bool = True) -> StepProfile:
  """The step-time table of an idle `Engine` (no requests in flight): its compiled steps timed
  directly, and the decode loop's cadence from a few probe requests it serves."""
  core = engine.core
  config = engine.config
  block_decode = lambda: jax.block_until_ready((core.tokens, core.kv_pages))
  profile = StepProfile(mode=engine.mode, page_size=config.page_size,
                        decode_batch=config.decode_batch,
                        num_pages=core.slots.capacity,
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
  # A fresh engine's first steps run slow (thread pools and buffers warming up): a discarded
  # warm-up probe first, then the quicker of two probes (the machine's other load only ever
  # slows one down).
  few, full = min(2, config.decode_batch), config.decode_batch
  _decode_cadence(engine, few, 4 * iters + 8)
  few_s, _, gaps = min((_decode_cadence(engine, few, 10 * iters + 8) for _ in range(2)),
                       key=lambda probe: probe[0])
  gaps = np.asarray(gaps)
  profile.jitter = [float(q) for q in np.quantile(gaps / np.median(gaps), np.linspace(0, 1, 41))]
  full_s = min(_decode_cadence(engine, full, 4 * iters + 8)[0] for _ in range(2))
  profile.decode_per_seq_s = max(full_s - few_s, 0.0) / max(full - few, 1)
  profile.decode_s = few_s - few * profile.decode_per_seq_s
  if engine.mode == "colocated":
    scheduler = engine.scheduler
    profile.chunk_size, profile.chunk_batch = config.chunk_size, config.chunk_batch
    # At the widest page table (contexts up to max_seq_len), as the profile always measured.
    for rows in scheduler.rows_per_shard:
      for c in scheduler.chunk_lens:
        profile.mixed_s[(rows * scheduler.dp, c)] = _pipelined_time(
            lambda r=rows, c=c: scheduler._run_mixed([], [], r, c, core.widths[-1]),  # pylint: disable=protected-access
            block_decode, iters)
    profile.read_lag_s = _read_lag(engine, profile, iters)
    return profile

  prefill = engine.prefill
  profile.prefill_batch = config.prefill_batch
  profile.length_buckets = tuple(prefill.length_buckets)
  extracted = {}
  for s in prefill.length_buckets:
    for b in prefill.batch_buckets_for(s):
      def run(b=b, s=s):
        _, kv = prefill.prefill_batch(np.zeros((b, s), np.int32), np.ones(b, np.int32), [])
        extracted[s] = prefill.extract(kv, np.int32(0))
      profile.prefill_s[(b, s)] = _median_time(run, lambda: jax.block_until_ready(extracted),
                                               iters)
  loop = engine.decode_loop
  for s in prefill.length_buckets:
    moved = {}

    def transfer(s=s):
      moved[s] = engine.plan.transfer(extracted[s])
    profile.transfer_s[s] = _median_time(transfer, lambda: jax.block_until_ready(moved), iters)
    profile.insert_s[s] = _median_time(lambda s=s: loop.insert_discarded(moved[s], s),
                                       block_decode, iters)
  # Interference: a prefill step of one `contention_bucket`-token request (default: the middle
  # length bucket) run back to back while the engine decodes two requests, against alone; and
  # the decode cadence meanwhile against without. (The decode step's device work does not depend
  # on how many slots are live; the host's per-sequence work is decode_per_seq_s.)
  bucket = contention_bucket or prefill.length_buckets[len(prefill.length_buckets) // 2]
  bucket = buckets.pick(bucket, prefill.length_buckets)
  background = {}

  def prefill_one():
    _, kv = prefill.prefill_batch(np.zeros((1, bucket), np.int32), np.ones(1, np.int32), [])
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
  profile.meta["contention_probe"] = dict(profile.contention)
  profile.read_lag_s = _read_lag(engine, profile, iters)
  if calibrate:
    # How much the two phases slow each other depends on how their steps overlap, which a
    # synthetic probe reproduces poorly (it measured 3.5x for prefill where served runs show
    # 1.5-2x): fit the factors to short served runs of the engine at a light and a moderate
    # load instead.
    served = [calibration_run(engine, profile, load=load, seed=1234 + i)
              for i, load in enumerate(CALIBRATION_LOADS)]
    profile.contention, profile.meta["contention_fit"] = fit_contention(profile, served)
  return profile


# Fractions of the rate the profile says the engine sustains, for the served calibration runs.
CALIBRATION_LOADS = (0.1, 0.3)


def calibration_run(engine, profile: StepProfile, load: float, num_requests: int = 64,
                    output_len: int = 24, seed: int = 1234):
  """Serves `num_requests` random requests (prompts spread over the length buckets up to 256
  tokens, `output_len` tokens out) at `load` x the rate the profile says the engine sustains.
  Returns (prompt_lens, output_lens, arrivals, measured metrics)."""
  from disagg_jax.bench import arrivals as arrivals_lib  # pylint: disable=g-import-not-at-top
  from disagg_jax.bench import metrics, runner  # pylint: disable=g-import-not-at-top
  from disagg_jax.bench.workloads import BenchRequest  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  output_len = max(min(output_len, profile.max_seq_len // 4), 2)
  longest = max(min(256, profile.max_seq_len - output_len,
                    max(profile.length_buckets or (256,))), 2)
  prompt_lens = rng.integers(max(longest // 8, 1), longest + 1, num_requests)
  output_lens = np.full(num_requests, output_len)
  mid = buckets.pick(int(np.median(prompt_lens)), profile.length_buckets)
  capacity = min(1.0 / profile.prefill(1, mid),
                 profile.decode_batch / (output_len * profile.decode_time(profile.decode_batch,
                                                                         0)))
  rate = load * capacity
  arrivals = arrivals_lib.arrival_times(num_requests, rate, 1.0, seed)
  vocab = engine.model.cfg.vocab_size
  requests = [BenchRequest([int(t) for t in rng.integers(3, vocab, n)], output_len)
              for n in prompt_lens]
  records, duration = runner.run(engine, requests, arrivals, seed=seed, progress=False)
  measured = metrics.compute(records, duration, {})
  measured["request_rate"] = rate
  return prompt_lens, output_lens, arrivals, measured


def fit_contention(profile: StepProfile, served) -> tuple[dict[str, float], dict]:
  """The contention factors with which the simulator best reproduces measured runs' median TTFT
  and TPOT (sum of squared relative errors over `served`, a list of calibration_run results):
  prefill's base factor and its growth per decoding sequence, and decode's factor. A coarse grid,
  then a finer one around its best. Returns the factors and a record of the fit."""
  from disagg_jax.bench import metrics  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import simulator  # pylint: disable=g-import-not-at-top
  keys = ("median_ttft_ms", "median_tpot_ms")

  def simulated(factors):
    trial = dataclasses.replace(profile, contention=factors)
    out = []
    for prompt_lens, output_lens, arrivals, _ in served:
      result = simulator.simulate(trial, prompt_lens, output_lens, arrivals)
      sim = metrics.compute(result.records, result.duration, {})
      out.append([sim[k] for k in keys])
    return out

  def error(got):
    return sum((g / m[k] - 1.0) ** 2 for row, (*_, m) in zip(got, served)
               for g, k in zip(row, keys))

  def search(prefills, per_seqs, decodes, best):
    for p in prefills:
      for q in per_seqs:
        for d in decodes:
          factors = {"prefill": round(float(p), 3), "prefill_per_seq": round(float(q), 4),
                     "decode": round(float(d), 3)}
          got = simulated(factors)
          err = error(got)
          if best is None or err < best[0]:
            best = (err, factors, got)
    return best

  best = search(np.arange(1.0, 3.01, 0.25), np.arange(0.0, 0.41, 0.05),
                np.arange(1.0, 2.01, 0.125), None)
  p, q, d = (best[1][k] for k in ("prefill", "prefill_per_seq", "decode"))
  best = search(np.clip(p + np.arange(-0.1, 0.11, 0.05), 1.0, None),
                np.clip(q + np.arange(-0.02, 0.021, 0.01), 0.0, None),
                np.clip(d + np.arange(-0.05, 0.051, 0.025), 1.0, None), best)
  _, factors, got = best
  record = [{"rate": m["request_rate"], "requests": len(prompt_lens),
             **{f"measured_{k}": m[k] for k in keys},
             **{f"fitted_{k}": g for k, g in zip(keys, row)}}
            for (prompt_lens, _, _, m), row in zip(served, got)]
  return factors, record
