"""Profiling a running engine for the simulator: its step-time table, calibrated on served runs.

    table = calibration.profile_engine(engine, iters=5)   # launch/profile.py, validate_sim.py

`sim.timing.measure` times the engine's steps and probes on the idle engine. A served run adds
what those probes reproduce poorly: a slower decode cadence (the benchmark's client threads read
every token on the engine's cores), colocated the mixed steps' served cost and the read lag,
and, disaggregated, how prefill and decode slow each other when their steps overlap. All are
fitted (`sim.contention.fit_served`) to short served runs of the engine at a light and a
moderate load. Serving those runs takes the benchmark
runner, which is why this lives in `bench/` and not in `sim/` (the simulator's package never
drives an engine through a workload).
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
  """The step-time table of an idle in-process `Engine` (`sim.timing.measure`); with
  `calibrate`, fitted to served runs (`sim.contention.fit_served`: a factor on the decode steps,
  and disaggregated the contention factors; the probe's factors are kept in
  meta["contention_probe"], the fit's record in meta["served_fit"])."""
  profile = timing.measure(engine, iters=iters, contention_bucket=contention_bucket)
  if calibrate:
    served = [calibration_run(engine, profile, load=load, seed=1234 + i)
              for i, load in enumerate(CALIBRATION_LOADS)]
    profile = contention.fit_served(profile, served)
  return profile


def _capacity(profile: StepProfile, prompt_len: int, output_len: int) -> float:
  """Requests per second the profile says the engine sustains on `prompt_len`-token prompts and
  `output_len` tokens out: the lower of its prefill and decode rates."""
  decode = profile.decode_batch / (output_len * profile.decode_time(profile.decode_batch, 0))
  if profile.mode == "colocated":
    chunk = min(prompt_len, profile.chunk_size)
    prefill = profile.mixed(1, chunk) * -(-prompt_len // profile.chunk_size)
  else:
    prefill = profile.prefill(1, buckets.pick(prompt_len, profile.length_buckets))
  return min(1.0 / prefill, decode)


def calibration_run(engine, profile: StepProfile, load: float, num_requests: int = 64,
                    output_len: int = 24, seed: int = 1234):
  """Serves `num_requests` random requests (prompts spread over the length buckets up to 256
  tokens, `output_len` tokens out) at `load` x the rate the profile says the engine sustains.
  Returns (prompt_lens, output_lens, arrivals, measured metrics, with the medians the fit
  matches: `sim.contention.targets`)."""
  rng = np.random.default_rng(seed)
  output_len = max(min(output_len, profile.max_seq_len // 4), 2)
  longest = max(min(256, profile.max_seq_len - output_len,
                    max(profile.length_buckets or (256,))), 2)
  prompt_lens = rng.integers(max(longest // 8, 1), longest + 1, num_requests)
  output_lens = np.full(num_requests, output_len)
  rate = load * _capacity(profile, int(np.median(prompt_lens)), output_len)
  arrivals = arrivals_lib.arrival_times(num_requests, rate, 1.0, seed)
  vocab = engine.model_cfg.vocab_size
  requests = [BenchRequest([int(t) for t in rng.integers(3, vocab, n)], output_len)
              for n in prompt_lens]
  records, duration = runner.run(engine, requests, arrivals, seed=seed, progress=False)
  measured = metrics.compute(records, duration, {})
  measured.update(contention.targets(profile.mode, profile.chunk_size, records, duration))
  measured["request_rate"] = rate
  return prompt_lens, output_lens, arrivals, measured
