"""Fitting a measured step profile to served runs of the engine.

Two things a served run has that the idle engine's probes (`sim.timing.measure`) reproduce
poorly are fitted here, as the parameters with which the simulator best reproduces served runs'
median TTFT and TPOT (`bench.calibration` serves those runs on a live engine):

  * the decode loop's cadence while it serves (both modes): the benchmark's client threads read
    every token on the engine's cores, and the table's cadence is the quicker of two probes, so
    served decode steps ran 10-26% slower than the table on this 2-core VM. One factor scales
    the table's decode steps (`decode_s` and `decode_shapes_s`; meta["served_decode_factor"]).
    A per-sequence cost (`decode_per_seq_s`) was tried first and fitted worse: fitted on the
    light calibration runs it overshot p90 TPOT by 30-50% at the highest validation rate.
  * for the colocated engine, the read lag (a step's end to its tokens reaching the caller): a
    lone probe request's TTFT less its mixed step measured 0-6 ms between profiles, and served
    runs' median TTFT was up to 5 ms off the simulated (on 2026-12-02 both calibration runs of
    a profile 4.5 and 4.9 ms short); `fit_read_lag` fits it to them.
  * for the disaggregated engine, how much its prefill and decode slow each other when they share
    a host's cores (`contention`), which depends on how their steps overlap (a synthetic probe
    measured 3.5x for prefill where served runs show 1.5-2x). Its decode factor and the decode
    factor above both set the served TPOT (one at every step, the other where a prefill
    overlaps), so `fit_served` fits those two together (`fit_decode_pair`), in rounds with the
    prefill factors, until nothing moves: fitted one after the other they stall short of the
    joint best (tests/sim/test_simulator.py has a case).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from disagg_jax.bench import metrics
from disagg_jax.sim import simulator
from disagg_jax.sim.profile import StepProfile


MAX_GRID_MOVES = 3
# Rounds of fits in `fit_served` (disaggregated) before it stops if they still move.
MAX_FIT_ROUNDS = 4
KEYS = ("median_ttft_ms", "median_tpot_ms")
# The decode factor's grid: 0.8 to 2.0 in steps of 0.01 (moved up while the best is on its upper
# edge).
DECODE_FACTOR_GRID = np.arange(0.8, 2.0 + 1e-9, 0.01)
# The colocated read lag's grid (seconds): 0 to 30 ms in steps of 0.25 ms.
READ_LAG_GRID = np.arange(0.0, 0.030 + 1e-9, 0.00025)


def _simulated(profile: StepProfile, served) -> list[list[float]]:
  """The simulator's median TTFT and TPOT for each served run's workload."""
  out = []
  for prompt_lens, output_lens, arrivals, _ in served:
    result = simulator.simulate(profile, prompt_lens, output_lens, arrivals)
    sim = metrics.compute(result.records, result.duration, {})
    out.append([sim[k] for k in KEYS])
  return out


def _error(got: list[list[float]], served) -> float:
  """Sum of squared relative errors against the served runs' medians."""
  return sum((g / m[k] - 1.0) ** 2 for row, (*_, m) in zip(got, served)
             for g, k in zip(row, KEYS))


def record(profile: StepProfile, served) -> list[dict]:
  """Each served run's rate, size, measured medians and the simulator's with `profile`."""
  got = _simulated(profile, served)
  return [{"rate": m["request_rate"], "requests": len(prompt_lens),
           **{f"measured_{k}": m[k] for k in KEYS},
           **{f"fitted_{k}": g for k, g in zip(KEYS, row)}}
          for (prompt_lens, _, _, m), row in zip(served, got)]


def scale_decode(profile: StepProfile, factor: float) -> StepProfile:
  """`profile` with its decode steps `factor` x as long (`decode_s` and every decode shape)."""
  return dataclasses.replace(profile, decode_s=profile.decode_s * factor,
                             decode_shapes_s={k: v * factor
                                              for k, v in profile.decode_shapes_s.items()})


def fit_decode_factor(profile: StepProfile, served) -> float:
  """The factor on `profile`'s decode steps with which the simulator best reproduces `served`
  (its other parameters as `profile` has them)."""
  grid, best = DECODE_FACTOR_GRID, None
  for _ in range(MAX_GRID_MOVES + 1):
    for f in grid:
      err = _error(_simulated(scale_decode(profile, float(f)), served), served)
      if best is None or err < best[0]:
        best = (err, round(float(f), 3))
    if best[1] < grid[-1] - 1e-9:
      break
    grid = grid + (grid[-1] - grid[0])
  return best[1]


def fit_served(profile: StepProfile, served) -> StepProfile:
  """`profile` fitted to served runs ((prompt_lens, output_lens, arrivals, measured metrics with
  "request_rate") per run, as `bench.calibration.calibration_run` returns them): its decode steps
  scaled by a fitted factor (`fit_decode_factor`); colocated, then the read lag and the
  factor in turn, twice (`fit_read_lag`; the probes' lag is kept in meta["probe_read_lag_s"]);
  disaggregated, in rounds until nothing moves (at most MAX_FIT_ROUNDS): the contention
  factors (`fit_contention`), then the decode factor and the decode contention together
  (`fit_decode_pair`; both set the served TPOT, so fitting them one after the other stalls
  short of their joint best). Every fit starts from
  the current values, so no round makes the fit worse. meta gets "served_decode_factor" (the
  product applied), "served_fit_rounds" (rounds made; 0 colocated) and "served_fit" (the runs'
  measured and fitted medians)."""
  fitted = dataclasses.replace(profile, meta=dict(profile.meta))
  factor = fit_decode_factor(fitted, served)
  fitted = scale_decode(fitted, factor)
  if fitted.mode == "colocated":
    # The lag moves only TTFT, the factor mostly TPOT (and TTFT a little, through the decode
    # steps a prompt waits for): twice in turn settles both.
    fitted.meta["probe_read_lag_s"] = fitted.read_lag_s
    for _ in range(2):
      fitted.read_lag_s = fit_read_lag(fitted, served)
      again = fit_decode_factor(fitted, served)
      fitted, factor = scale_decode(fitted, again), factor * again
  rounds = 0
  while fitted.mode == "disagg" and rounds < MAX_FIT_ROUNDS:
    before = dict(fitted.contention)
    fitted.contention, _ = fit_contention(fitted, served)
    again, decode = fit_decode_pair(fitted, served)
    fitted = scale_decode(fitted, again)
    fitted.contention = {**fitted.contention, "decode": decode}
    factor, rounds = factor * again, rounds + 1
    if again == 1.0 and fitted.contention == before:
      break
  fitted.meta["served_decode_factor"] = round(factor, 4)
  fitted.meta["served_fit_rounds"] = rounds
  fitted.meta["served_fit"] = record(fitted, served)
  return fitted


def fit_read_lag(profile: StepProfile, served) -> float:
  """The read lag (from a step's end to its tokens reaching the caller) with which the simulator
  best reproduces `served`, over READ_LAG_GRID and the profile's own (so never worse than it).
  Colocated, every token is read that late, so the lag moves TTFT and leaves TPOT alone."""
  best = (_error(_simulated(profile, served), served), profile.read_lag_s)
  for lag in READ_LAG_GRID:
    lag = round(float(lag), 6)
    err = _error(_simulated(dataclasses.replace(profile, read_lag_s=lag), served), served)
    if err < best[0]:
      best = (err, lag)
  return best[1]


def fit_decode_pair(profile: StepProfile, served) -> tuple[float, float]:
  """(factor on `profile`'s decode steps, decode contention) fitted together: a coarse grid
  (factor 0.7-1.3 in 0.05, contention 1.0-3.0 in 0.1), then a finer one around its best,
  starting from (1.0, the profile's decode contention)."""

  def error(f, d):
    trial = scale_decode(profile, f)
    trial.contention = {**profile.contention, "decode": d}
    return _error(_simulated(trial, served), served)

  def search(factors, decodes, best):
    for f in factors:
      for d in decodes:
        f, d = round(float(f), 3), round(float(d), 3)
        err = error(f, d)
        if err < best[0]:
          best = (err, f, d)
    return best

  d0 = profile.contention.get("decode", 1.0)
  best = search(np.arange(0.7, 1.31, 0.05), np.arange(1.0, 3.01, 0.1), (error(1.0, d0), 1.0, d0))
  _, f, d = best
  best = search(np.clip(f + np.arange(-0.04, 0.041, 0.01), 0.1, None),
                np.clip(d + np.arange(-0.08, 0.081, 0.02), 1.0, None), best)
  return best[1], best[2]


def fit_contention(profile: StepProfile, served) -> tuple[dict[str, float], list[dict]]:
  """The contention factors with which the simulator best reproduces measured runs' median TTFT
  and TPOT (sum of squared relative errors over `served`, as `fit_served` takes it): prefill's
  base factor and its growth per decoding sequence, and decode's factor. A coarse grid (moved
  up while the best lies on its upper edge), then a finer one around its best. Returns the
  factors and a record of the fit. The search starts from `profile`'s own factors, so the fit
  is never worse than them."""

  def search(prefills, per_seqs, decodes, best):
    for p in prefills:
      for q in per_seqs:
        for d in decodes:
          factors = {"prefill": round(float(p), 3), "prefill_per_seq": round(float(q), 4),
                     "decode": round(float(d), 3)}
          err = _error(_simulated(dataclasses.replace(profile, contention=factors), served),
                       served)
          if best is None or err < best[0]:
            best = (err, factors)
    return best

  # A coarse grid, moved up while the best lies on its upper edge (on a busy host decode can
  # slow by more than 2x), then a finer grid around the best.
  prefills, per_seqs, decodes = (np.arange(1.0, 3.01, 0.25), np.arange(0.0, 0.41, 0.05),
                                 np.arange(1.0, 2.01, 0.125))
  start = {"prefill": profile.contention.get("prefill", 1.0),
           "prefill_per_seq": profile.contention.get("prefill_per_seq", 0.0),
           "decode": profile.contention.get("decode", 1.0)}
  best = (_error(_simulated(dataclasses.replace(profile, contention=start), served), served),
          start)
  best = search(prefills, per_seqs, decodes, best)
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
  factors = best[1]
  return factors, record(dataclasses.replace(profile, contention=factors), served)
