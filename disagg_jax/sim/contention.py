"""Fitting a step profile's contention factors to measured runs of the engine.

How much prefill and decode slow each other when they share a host's cores depends on how their
steps overlap, which a synthetic probe (`sim.timing.measure`) reproduces poorly. `fit_contention`
instead searches the factors with which the simulator best reproduces served runs' median TTFT
and TPOT; `bench.calibration` serves those runs on a live engine.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from disagg_jax.bench import metrics
from disagg_jax.sim import simulator
from disagg_jax.sim.profile import StepProfile


MAX_GRID_MOVES = 3


def fit_contention(profile: StepProfile, served) -> tuple[dict[str, float], dict]:
  """The contention factors with which the simulator best reproduces measured runs' median TTFT
  and TPOT (sum of squared relative errors over `served`: (prompt_lens, output_lens, arrivals,
  measured metrics with "request_rate") per run, as `bench.calibration.calibration_run` returns
  them): prefill's base factor and its growth per decoding sequence, and decode's factor. A
  coarse grid (moved up while the best lies on its upper edge), then a finer one around its
  best. Returns the factors and a record of the fit."""
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

  # A coarse grid, moved up while the best lies on its upper edge (on a busy host decode can
  # slow by more than 2x), then a finer grid around the best.
  prefills, per_seqs, decodes = (np.arange(1.0, 3.01, 0.25), np.arange(0.0, 0.41, 0.05),
                                 np.arange(1.0, 2.01, 0.125))
  best = search(prefills, per_seqs, decodes, None)
  for _ in range(MAX_GRID_MOVES):
    at_edge = [best[1][k] >= grid[-1] - 1e-9 for k, grid in
               (("prefill", prefills), ("prefill_per_seq", per_seqs), ("decode", decodes))]
    if not any(at_edge):
      break
    moved = [grid + (grid[-1] - grid[0]) if edge else grid
             for edge, grid in zip(at_edge, (prefills, per_seqs, decodes))]
    prefills, per_seqs, decodes = moved
    best = search(prefills, per_seqs, decodes, best)
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
