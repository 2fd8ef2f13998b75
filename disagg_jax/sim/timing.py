"""Live timing: the step-time table (`sim.profile.StepProfile`) of a running in-process engine.

`measure(engine)` times the engine's own compiled step functions, so the table is exactly the
code that serves. Decode and mixed steps are timed back to back, as the engine's loops dispatch
them one ahead; prefill steps one at a time, as the prefill worker waits for each step's first
tokens. The decode cadence, the read lag and (disaggregated) how much prefill and decode slow
each other come from probe requests the engine serves.

What it relies on, all public (`disagg_jax.engine.engine.Engine`):
  - the serving API (`engine.api.EngineAPI`): `add_request`, `mode`, `limits`, `num_devices`;
  - `config` (page_size, decode_batch, prefill_batch, chunk_size, chunk_batch), `page_capacity`
    and `length_buckets`;
  - the step hooks: `wait_decode`, `decode_step_shapes`, `mixed_step_shapes` /
    `run_mixed_step` (colocated),
    `prefill_step_shapes` / `run_prefill_step`, `extract_kv`, `transfer_kv` and
    `run_insert_step` (disaggregated).
It must run on an idle engine (no requests in flight). `bench.calibration.profile_engine` fits to
served runs what the probes miss: the decode cadence while a workload is served, and the
contention factors this measures with a synthetic probe.
"""

from __future__ import annotations

import statistics
import threading
import time

import jax
import numpy as np

from disagg_jax.engine import buckets
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.kv.pages import pages_for
from disagg_jax.sched.pool import SlotPool
from disagg_jax.sim.profile import StepProfile


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


def _probe_prompt(engine, width: int) -> int:
  """A probe prompt's length for decode steps `width` pages wide: 8 tokens at the narrowest
  width, else one token past the next narrower width (so the table is exactly `width` wide)."""
  widths = sorted({w for _, w in engine.decode_step_shapes()})
  if width == widths[0]:
    return 8
  return widths[widths.index(width) - 1] * engine.config.page_size + 1


def _decode_cadence(engine, num_requests: int, new_tokens: int, width: int | None = None,
                    during=None):
  """The decode loop's cadence at one step shape: the median gap between tokens of
  `num_requests` probe requests served together, counted only while all of them decode (after
  the last one's first token, before the first one's last), so that neither their prefill nor
  a changing batch is in it. Their prompts keep the page table `width` pages wide (default the
  narrowest) for `new_tokens` tokens each (capped to stay within the width and max_seq_len).
  With `during`, it runs on another thread while waves of such requests keep the decode loop
  busy, and its result is returned too. Returns (median gap, during's result, all gaps)."""
  width = width or min(w for _, w in engine.decode_step_shapes())
  prompt = _probe_prompt(engine, width)
  room = min(width * engine.config.page_size, engine.limits.max_seq_len) - prompt
  sampling = SamplingParams(max_new_tokens=max(min(new_tokens, room), 1), ignore_eos=True)
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
    streams = [engine.add_request([10 + (i + k) % 50 for k in range(prompt)], sampling)
               for i in range(num_requests)]
    times = [np.asarray(stream.result().metrics.token_times) for stream in streams]
    all_in, first_out = max(t[0] for t in times), min(t[-1] for t in times)
    wave = [b - a for t in times for a, b in zip(t[1:-1], t[2:])
            if a >= all_in and b <= first_out]
    gaps += wave or [g for t in times for g in np.diff(t)[1:]]
    if during is None or done.is_set():
      break
  return float(np.median(gaps)), result.get("value"), gaps


def _read_lag(engine, profile: StepProfile, iters: int) -> float:
  """How long after its step ends the engine hands out a first token: a lone request's TTFT
  minus its one step alone (colocated: a mixed step; disaggregated: a prefill step), the median
  of 4 x `iters` probes (one at a time; a few alone are noisy, 13-19 ms between profiles)."""
  if profile.mode == "colocated":
    prompt = min(profile.chunk_size, 64, profile.max_seq_len - 3)
    pool = SlotPool(1, pages_for(prompt + 2, profile.page_size), profile.page_size)
    pool.assign(None, prompt + 1, 0)
    step = profile.mixed(1, prompt, pool)
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


WAKE_IDLE_S = (0.03, 0.1, 0.3, 1.0)


def _wake(engine, iters: int) -> list[list[float]]:
  """[idle seconds, extra TTFT] for each of WAKE_IDLE_S: lone 64-token requests, each sent that
  long after the previous one finished, against the same sent back to back (medians)."""
  prompt = min(64, engine.limits.max_seq_len - 3)
  sampling = SamplingParams(max_new_tokens=2, ignore_eos=True)

  def ttft(idle: float) -> float:
    times = []
    for i in range(max(iters, 3)):
      time.sleep(idle)
      m = engine.add_request([10 + (i + k) % 50 for k in range(prompt)],
                             sampling).result().metrics
      times.append(m.token_times[0] - m.arrival)
    return statistics.median(times)
  ttft(0.0)  # warm
  base = ttft(0.0)
  return [[idle, max(ttft(idle) - base, 0.0)] for idle in WAKE_IDLE_S]


def measure(engine, iters: int = 5, contention_bucket: int | None = None) -> StepProfile:
  """The step-time table of an idle `Engine` (no requests in flight): its compiled steps timed
  directly, and the decode loop's cadence from a few probe requests it serves. Disaggregated,
  `contention` holds the factors of a synthetic probe (a prefill step of `contention_bucket`
  tokens, default the middle length bucket, while the engine decodes);
  `bench.calibration.profile_engine` fits them to served runs instead."""
  config = engine.config
  block_decode = engine.wait_decode
  profile = StepProfile(mode=engine.mode, page_size=config.page_size,
                        decode_batch=config.decode_batch,
                        num_pages=engine.page_capacity,
                        max_seq_len=engine.limits.max_seq_len,
                        decode_s=0.0, dp=engine.core.slots.num_shards,
                        prefix_caching=engine.core.slots.prefix_caching,
                        run_ahead=config.run_ahead,
                        staging_tokens=engine.pool.staging_tokens if engine.mode == "disagg"
                        else 0,
                        meta={"date": time.strftime("%Y-%m-%d %H:%M"),
                              "device": jax.devices()[0].device_kind,
                              "num_devices": engine.num_devices, "iters": iters})
  # CPU devices run one computation at a time: a dispatch returns once the previous one has run,
  # and a copy onto the decode devices waits for their decode step.
  profile.transfer_waits_for_decode = jax.devices()[0].platform == "cpu"
  # The decode step as the engine's own loop achieves it (dispatch, sampling, streaming and
  # all), from the token gaps of probe requests, per step shape: a few requests (the smallest
  # rows bucket) and a full batch (every row), at each page-table width. The host's work per
  # sequence is inside these cadences, so decode_per_seq_s stays 0 for measured tables; a served
  # run's slower cadence is fitted afterwards (`bench.calibration`: one factor on all of them).
  # A fresh engine's first steps run slow (thread pools and buffers warming up): a discarded
  # warm-up probe first, then the quicker of two probes (the machine's other load only ever
  # slows one down).
  shapes = engine.decode_step_shapes()
  row_totals = sorted({r for r, _ in shapes})
  widths = sorted({w for _, w in shapes})
  few, full = min(2, config.decode_batch), config.decode_batch
  few_rows = next(r for r in row_totals if r >= few)
  repeats = 2 if iters >= 3 else 1
  _decode_cadence(engine, few, 4 * iters + 8)
  few_s, _, gaps = min((_decode_cadence(engine, few, 10 * iters + 8) for _ in range(repeats)),
                       key=lambda probe: probe[0])
  gaps = np.asarray(gaps)
  profile.jitter = [float(q) for q in np.quantile(gaps / np.median(gaps), np.linspace(0, 1, 41))]
  profile.decode_ref = (few_rows, widths[0])
  profile.decode_shapes_s[profile.decode_ref] = profile.decode_s = few_s
  for width in widths:
    for count, rows in ((few, few_rows), (full, row_totals[-1])):
      if (rows, width) not in profile.decode_shapes_s:
        # A full batch decodes all the width allows: the window with every request decoding
        # must outlast its admissions.
        tokens = 10 * iters + 8 if count == few else engine.limits.max_seq_len
        profile.decode_shapes_s[(rows, width)] = min(
            _decode_cadence(engine, count, tokens, width)[0] for _ in range(repeats))
  if engine.mode == "colocated":
    profile.chunk_size, profile.chunk_batch = config.chunk_size, config.chunk_batch
    # Per page-table width; mixed_s keeps the widest (contexts up to max_seq_len).
    widest = max(w for _, _, w in engine.mixed_step_shapes())
    for rows, c, width in engine.mixed_step_shapes():
      seconds = _pipelined_time(lambda r=rows, c=c, w=width: engine.run_mixed_step(r, c, w),
                                block_decode, iters)
      profile.mixed_widths_s[(rows, c, width)] = seconds
      if width == widest:
        profile.mixed_s[(rows, c)] = seconds
    profile.read_lag_s = _read_lag(engine, profile, iters)
    profile.wake_s = _wake(engine, iters)
    return profile

  profile.prefill_batch = config.prefill_batch
  profile.prefill_dp = engine.prefill.steps.dp
  profile.length_buckets = tuple(engine.length_buckets)
  # A request's KV moves in this many layer groups; transfer_s is all of them.
  profile.transfer_groups = len(engine.prefill.groups)
  extracted = {}
  for b, s in engine.prefill_step_shapes():
    def run(b=b, s=s):
      extracted[s] = engine.extract_kv(engine.run_prefill_step(b, s))
    profile.prefill_s[(b, s)] = _median_time(run, lambda: jax.block_until_ready(extracted),
                                             iters)
  for s in profile.length_buckets:
    moved = {}

    def transfer(s=s):
      moved[s] = engine.transfer_kv(extracted[s])
    profile.transfer_s[s] = _median_time(transfer, lambda: jax.block_until_ready(moved), iters)
    profile.insert_s[s] = _median_time(lambda s=s: engine.run_insert_step(moved[s]),
                                       block_decode, iters)
  # Interference: a prefill step of one `contention_bucket`-token request (default: the middle
  # length bucket) run back to back while the engine decodes two requests, against alone; and
  # the decode cadence meanwhile against without. (The decode step's device work does not depend
  # on how many slots are live; the host's per-sequence work is decode_per_seq_s.)
  lengths = profile.length_buckets
  bucket = buckets.pick(contention_bucket or lengths[len(lengths) // 2], lengths)
  background = {}

  def prefill_one():
    background["kv"] = engine.run_prefill_step(profile.prefill_batches()[0], bucket)
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
  profile.wake_s = _wake(engine, iters)
  return profile
