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
  * for the colocated engine, the mixed steps' cost and the read lag (a step's end to its
    tokens reaching the caller). The mixed steps are timed back to back on the idle engine, and
    served runs' multi-chunk prompts took less per chunk on some VMs (0.75x fitted), while a lone
    probe request's TTFT less its mixed step (the probed lag) measured 0-6 ms between profiles
    against up to 13 ms fitted. The two are told apart by the median TTFT of the prompts that
    take one chunk (one mixed step and the lag) and of those that take more (each chunk a step,
    the lag once): `fit_colocated` fits both to them, with the decode factor. Fitted to the
    median TTFT of all prompts instead, the lag alone left the validation runs' median TTFT
    8-13% high: when about half the prompts take one chunk, that median lies between the two
    groups and moves with how far apart they are.
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
# The medians fitted: colocated the TTFT of the prompts that take one chunk and of those that
# take more (`targets`) in place of the median TTFT.
KEYS = ("median_ttft_ms", "median_tpot_ms")
COLOCATED_KEYS = ("median_ttft_one_chunk_ms", "median_ttft_more_chunks_ms", "median_tpot_ms")
# The decode factor's grid: 0.8 to 2.0 in steps of 0.01 (moved up while the best is on its upper
# edge).
DECODE_FACTOR_GRID = np.arange(0.8, 2.0 + 1e-9, 0.01)
# Colocated, the decode factor and the mixed steps' factor are fitted together, each pair with
# its best read lag (`fit_colocated`): a coarse grid (decode 0.5 to 2.0 in steps of 0.05,
# reaching up to 1.5x the factor fitted to TPOT alone where that is higher; mixed 0.5 to 1.5 in
# steps of 0.1), then two finer ones around the best so far, each step a quarter of the one
# before, two steps either side.
DECODE_COARSE_STEP = 0.05
MIXED_FACTOR_GRID = np.arange(0.5, 1.5 + 1e-9, 0.1)


def targets(mode: str, chunk_size: int, records, duration: float) -> dict[str, float]:
  """The medians a fit matches, of one run's request records: median TTFT and TPOT;
  colocated (`mode`), the TTFT split by whether the prompt took one chunk of `chunk_size` or
  more (COLOCATED_KEYS; a group with no requests is left out)."""
  out = {k: v for k, v in metrics.compute(records, duration, {}).items() if k in KEYS}
  if mode == "colocated":
    done = [r for r in records if r.success]
    for key, group in (("median_ttft_one_chunk_ms", [r for r in done
                                                     if r.prompt_len <= chunk_size]),
                       ("median_ttft_more_chunks_ms", [r for r in done
                                                       if r.prompt_len > chunk_size])):
      if group:
        out[key] = float(np.median([r.ttft for r in group])) * 1e3
  return out


def _keys(profile: StepProfile, measured: dict) -> tuple[str, ...]:
  """The medians fitted for a served run: COLOCATED_KEYS where it has them (colocated), else
  KEYS."""
  if profile.mode == "colocated" and all(k in measured for k in COLOCATED_KEYS):
    return COLOCATED_KEYS
  return KEYS


def _simulated(profile: StepProfile, served) -> list[dict[str, float]]:
  """The simulator's medians (`targets`) for each served run's workload."""
  out = []
  for prompt_lens, output_lens, arrivals, _ in served:
    result = simulator.simulate(profile, prompt_lens, output_lens, arrivals)
    out.append(targets(profile.mode, profile.chunk_size, result.records, result.duration))
  return out


def _error(got: list[dict[str, float]], served, profile: StepProfile,
           keys: tuple[str, ...] | None = None) -> float:
  """Sum of squared relative errors against the served runs' medians: `keys` (default `_keys`)."""
  return sum((row[k] / m[k] - 1.0) ** 2 for row, (*_, m) in zip(got, served)
             for k in (keys or _keys(profile, m)))


def _fit_error(profile: StepProfile, served, keys: tuple[str, ...] | None = None) -> float:
  return _error(_simulated(profile, served), served, profile, keys)


def record(profile: StepProfile, served) -> list[dict]:
  """Each served run's rate, size, measured medians and the simulator's with `profile`."""
  got = _simulated(profile, served)
  return [{"rate": m["request_rate"], "requests": len(prompt_lens),
           **{f"measured_{k}": m[k] for k in _keys(profile, m)},
           **{f"fitted_{k}": row[k] for k in _keys(profile, m)}}
          for (prompt_lens, _, _, m), row in zip(served, got)]


def scale_decode(profile: StepProfile, factor: float) -> StepProfile:
  """`profile` with its decode steps `factor` x as long (`decode_s` and every decode shape)."""
  return dataclasses.replace(profile, decode_s=profile.decode_s * factor,
                             decode_shapes_s={k: v * factor
                                              for k, v in profile.decode_shapes_s.items()})


def scale_mixed(profile: StepProfile, factor: float) -> StepProfile:
  """`profile` with its mixed steps (`mixed_s` and `mixed_widths_s`) `factor` x as long."""
  return dataclasses.replace(profile, mixed_s={k: v * factor for k, v in profile.mixed_s.items()},
                             mixed_widths_s={k: v * factor
                                             for k, v in profile.mixed_widths_s.items()})


def fit_decode_factor(profile: StepProfile, served, keys: tuple[str, ...] | None = None) -> float:
  """The factor on `profile`'s decode steps with which the simulator best reproduces `served`'s
  medians `keys` (default all it fits, `_keys`; its other parameters as `profile` has them)."""
  grid, best = DECODE_FACTOR_GRID, None
  for _ in range(MAX_GRID_MOVES + 1):
    for f in grid:
      err = _fit_error(scale_decode(profile, float(f)), served, keys)
      if best is None or err < best[0]:
        best = (err, round(float(f), 3))
    if best[1] < grid[-1] - 1e-9:
      break
    grid = grid + (grid[-1] - grid[0])
  return best[1]


def fit_served(profile: StepProfile, served) -> StepProfile:
  """`profile` fitted to served runs ((prompt_lens, output_lens, arrivals, measured metrics with
  "request_rate") per run, as `bench.calibration.calibration_run` returns them). Every fit's
  search includes the current values, so none makes the fit worse:

    * colocated: the decode steps, the mixed steps and the read lag fitted together
      (`fit_colocated`; one round; the probes' lag is kept in meta["probe_read_lag_s"], the
      mixed steps' factor in meta["served_mixed_factor"]).
    * disaggregated: its decode steps scaled by a factor fitted to median TTFT and TPOT, then,
      in rounds until nothing moves (at most MAX_FIT_ROUNDS), the contention factors
      (`fit_contention`) and the decode factor with the decode contention together
      (`fit_decode_pair`; both set the served TPOT, so fitting them one after the other stalls
      short of their joint best).

  meta gets "served_decode_factor" (the product applied), "served_fit_rounds" (rounds made) and
  "served_fit" (the runs' measured and fitted medians)."""
  fitted = dataclasses.replace(profile, meta=dict(profile.meta))
  rounds, factor = 0, 1.0
  if fitted.mode == "colocated":
    fitted.meta["probe_read_lag_s"] = fitted.read_lag_s
    factor, mixed, lag = fit_colocated(fitted, served)
    fitted = dataclasses.replace(scale_mixed(scale_decode(fitted, factor), mixed), read_lag_s=lag)
    fitted.meta["served_mixed_factor"] = mixed
    rounds = 1
  else:
    factor = fit_decode_factor(fitted, served)
    fitted = scale_decode(fitted, factor)
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


def _best_lag(got: list[dict[str, float]], served, profile: StepProfile) -> float:
  """The read lag (>= 0) that best fits `served`'s TTFT medians (those `_keys` fits), given the
  simulator's medians `got` with no lag. Colocated, every token is read the lag after its step
  and nothing the loop decides waits for the read, so the lag adds to every TTFT and leaves
  TPOT alone: the least-squares lag of the relative errors is closed-form."""
  pairs = [(row[k], m[k]) for row, (*_, m) in zip(got, served) for k in _keys(profile, m)
           if "ttft" in k]
  if not pairs:
    return 0.0
  lag_ms = (sum((want - have) / want ** 2 for have, want in pairs)
            / sum(1.0 / want ** 2 for _, want in pairs))
  return max(lag_ms, 0.0) / 1e3


def fit_colocated(profile: StepProfile, served) -> tuple[float, float, float]:
  """(factor on `profile`'s decode steps, factor on its mixed steps, read lag) with which the
  simulator best reproduces `served` (colocated), fitted together (DECODE_COARSE_STEP), each
  pair of factors with its best lag (`_best_lag`). The decode steps set TPOT; the lag moves
  every TTFT alike; the mixed steps move a prompt's TTFT by each of its chunks (and TPOT where a
  token shares a mixed step), so prompts of one chunk and of more (COLOCATED_KEYS) tell the two
  apart. Fitted in turn, the three stalled short of their joint best
  (tests/sim/test_simulator.py has the case). The search includes (1.0, 1.0, the profile's
  lag), so the fit is never worse than the profile."""

  def fit(d, m):
    trial = dataclasses.replace(scale_mixed(scale_decode(profile, d), m), read_lag_s=0.0)
    got = _simulated(trial, served)
    lag = round(_best_lag(got, served, trial), 6)
    shifted = [{k: v + lag * 1e3 if "ttft" in k else v for k, v in row.items()} for row in got]
    return _error(shifted, served, trial), lag

  def search(decodes, mixeds, best):
    for d in decodes:
      for m in mixeds:
        d, m = round(float(d), 4), round(float(m), 4)
        err, lag = fit(d, m)
        if err < best[0]:
          best = (err, d, m, lag)
    return best

  top = max(2.0, 1.5 * fit_decode_factor(profile, served, ("median_tpot_ms",)))
  best = search(np.arange(0.5, top + 1e-9, DECODE_COARSE_STEP), MIXED_FACTOR_GRID,
                (_fit_error(profile, served), 1.0, 1.0, profile.read_lag_s))
  steps = np.array([DECODE_COARSE_STEP, MIXED_FACTOR_GRID[1] - MIXED_FACTOR_GRID[0]])
  for _ in range(2):
    steps = steps / 4
    _, d, m, _ = best
    best = search(np.clip(d + steps[0] * np.arange(-2, 3), 0.05, None),
                  np.clip(m + steps[1] * np.arange(-2, 3), 0.05, None), best)
  return best[1], best[2], best[3]


def fit_decode_pair(profile: StepProfile, served) -> tuple[float, float]:
  """(factor on `profile`'s decode steps, decode contention) fitted together: a coarse grid
  (factor 0.7-1.3 in 0.05, contention 1.0-3.0 in 0.1), then a finer one around its best,
  starting from (1.0, the profile's decode contention)."""

  def error(f, d):
    trial = scale_decode(profile, f)
    trial.contention = {**profile.contention, "decode": d}
    return _fit_error(trial, served)

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
          err = _fit_error(dataclasses.replace(profile, contention=factors), served)
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
  best = (_fit_error(dataclasses.replace(profile, contention=start), served), start)
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
