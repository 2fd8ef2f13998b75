"""Profiling a running engine for the simulator: its step-time table, calibrated on served runs.

    table = calibration.profile_engine(engine, iters=5)   # launch/profile.py, validate_sim.py

`sim.timing.measure` times the engine's steps and probes. For the disaggregated engine, how much
its prefill and decode slow each other depends on how their steps overlap, which a synthetic probe
reproduces poorly (it measured 3.5x for prefill where served runs show 1.5-2x), so the factors are
fitted (`sim.contention.fit_contention`) to short served runs of the engine at a light and a
moderate load instead. Serving those runs takes the benchmark runner, which is why this lives in
`bench/` and not in `sim/` (the simulator's package never drives an engine through a workload).
"""

from __future__ import annotations

import numpy as np

from disagg_jax.bench import arrivals as arrivals_lib
from disagg_jax.bench import metrics, runner
from disagg_jax.bench.workloads import BenchRequest
from disagg_jax.engine import buckets
from disagg_jax.sim import contention, timing
from disagg_jax.sim.profile import StepProfile

# Fractions of the rate the profile says the engine sustains, for the served calibration runs.
CALIBRATION_LOADS = (0.1, 0.3)


def profile_engine(engine, iters: int = 5, contention_bucket: int | None = None,
                   calibrate: bool = True) -> StepProfile:
  """The step-time table of an idle in-process `Engine` (`sim.timing.measure`); disaggregated and
  with `calibrate`, its contention factors fitted to served runs (the probe's are kept in
  meta["contention_probe"], the fit in meta["contention_fit"])."""
  profile = timing.measure(engine, iters=iters, contention_bucket=contention_bucket)
  if calibrate and profile.mode == "disagg":
    served = [calibration_run(engine, profile, load=load, seed=1234 + i)
              for i, load in enumerate(CALIBRATION_LOADS)]
    profile.contention, profile.meta["contention_fit"] = contention.fit_contention(profile,
                                                                                  served)
  return profile


def calibration_run(engine, profile: StepProfile, load: float, num_requests: int = 64,
                    output_len: int = 24, seed: int = 1234):
  """Serves `num_requests` random requests (prompts spread over the length buckets up to 256
  tokens, `output_len` tokens out) at `load` x the rate the profile says the engine sustains.
  Returns (prompt_lens, output_lens, arrivals, measured metrics)."""
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
  vocab = engine.model_cfg.vocab_size
  requests = [BenchRequest([int(t) for t in rng.integers(3, vocab, n)], output_len)
              for n in prompt_lens]
  records, duration = runner.run(engine, requests, arrivals, seed=seed, progress=False)
  measured = metrics.compute(records, duration, {})
  measured["request_rate"] = rate
  return prompt_lens, output_lens, arrivals, measured
