"""How simulated-against-measured errors are computed and tabulated."""

import os

import numpy as np
import pytest

from disagg_jax.sim import validate


def _row():
  measured = {"median_ttft_ms": 40.0, "p90_ttft_ms": 80.0, "median_tpot_ms": 20.0,
              "p90_tpot_ms": 25.0, "output_throughput": 100.0, "slo_attainment": 0.9}
  simulated = dict(measured, median_ttft_ms=44.0, median_tpot_ms=19.0, slo_attainment=0.87)
  return {"mode": "disagg", "request_rate": 4.0, "measured": measured, "simulated": simulated,
          "errors": validate.compare(measured, simulated),
          "attainment": {"ttft:200,tpot:30": [0.99, 0.97]}}


def test_errors_are_relative_and_attainment_in_points():
  errors = _row()["errors"]
  assert errors["median_ttft_ms"] == pytest.approx(0.10)
  assert errors["median_tpot_ms"] == pytest.approx(-0.05)
  assert errors["p90_tpot_ms"] == 0.0
  assert errors["slo_attainment"] == pytest.approx(-3.0)


def test_tables():
  table = validate.markdown_table([_row()])
  assert "| disagg | 4 | 40 / 44 (+10.0%)" in table
  assert "90% / 87% (-3.0 pp)" in table
  extra = validate.attainment_table([_row(), {"mode": "colocated", "request_rate": 2.0}])
  assert "| disagg | 4 | 99% / 97% (-2.0 pp) |" in extra
  assert "| colocated | 2 | – |" in extra


def test_repeated_runs_are_compared_with_the_first():
  first, second = _row(), _row()
  second["repeat"] = 1
  second["measured"] = dict(first["measured"], median_ttft_ms=44.0, slo_attainment=0.8)
  table = validate.repeatability_table([first, second])
  assert "| disagg | 4 (run 2) | 40 / 44 (+10.0%)" in table
  assert "90% / 80% (-10.0 pp)" in table
  assert validate.repeatability_table([first]) == ""
  assert "4 (run 2)" in validate.markdown_table([first, second])


# Fidelity against the noise.

def _run_row(mode, rate, session, repeat, measured, simulated):
  return {"mode": mode, "request_rate": rate, "session": session, "repeat": repeat,
          "goodput": "ttft:100,tpot:20", "measured": measured, "simulated": simulated}


def _metrics(ttft=40.0, p90_ttft=80.0, tpot=20.0, p90_tpot=25.0, thr=100.0, att=0.9):
  return {"median_ttft_ms": ttft, "p90_ttft_ms": p90_ttft, "median_tpot_ms": tpot,
          "p90_tpot_ms": p90_tpot, "output_throughput": thr, "slo_attainment": att}


def _two_runs():
  """Real runs 40 and 44 ms (mean 42, spread 4/42 = 9.5%); the simulation 43.68 (+4%)."""
  sim = _metrics(ttft=43.68, p90_ttft=100.0, tpot=20.5, p90_tpot=25.0, thr=103.0, att=0.80)
  return [_run_row("colocated", 4.0, "s1", 0, _metrics(), sim),
          _run_row("colocated", 4.0, "s1", 1, _metrics(ttft=44.0, p90_ttft=84.0, tpot=20.0,
                                                        thr=100.1, att=0.7), sim)]


def test_fidelity_error_is_against_the_mean_and_spread_is_max_minus_min():
  (group,) = validate.fidelity(_two_runs())
  assert (group["mode"], group["request_rate"], group["runs"]) == ("colocated", 4.0, 2)
  cell = group["metrics"]["median_ttft_ms"]
  assert cell["real_mean"] == pytest.approx(42.0)
  assert cell["error"] == pytest.approx(0.04)
  assert cell["run_errors"] == pytest.approx([0.092, 43.68 / 44 - 1])
  assert cell["spread"] == pytest.approx(4.0 / 42.0)
  assert cell["within_noise"] is True and cell["within_5pct"] is True
  # p90 TTFT: +22% against a 4.9% spread; no 5% rule on p90s.
  p90 = group["metrics"]["p90_ttft_ms"]
  assert p90["error"] == pytest.approx(100 / 82 - 1)
  assert p90["within_noise"] is False and p90["within_5pct"] is None
  # Identical real runs: spread 0, so only an exact simulation is within the noise.
  p90_tpot = group["metrics"]["p90_tpot_ms"]
  assert p90_tpot["spread"] == 0.0 and p90_tpot["error"] == 0.0 and p90_tpot["within_noise"]
  tpot = group["metrics"]["median_tpot_ms"]
  assert tpot["within_noise"] is False and tpot["within_5pct"] is True
  # Throughput: +2.95% against 0.1%: outside the noise, within 5%.
  thr = group["metrics"]["output_throughput"]
  assert thr["within_noise"] is False and thr["within_5pct"] is True
  # Attainment in percentage points: mean 80%, simulated 80%, spread 20 pp.
  att = group["metrics"]["slo_attainment"]
  assert att["kind"] == "pp" and att["error"] == pytest.approx(0.0, abs=1e-9)
  assert att["run_errors"] == pytest.approx([-10.0, 10.0])
  assert att["spread"] == pytest.approx(20.0) and att["within_noise"] is True


def test_fidelity_three_runs_and_one_run():
  sim = _metrics(ttft=50.0)
  rows = [_run_row("disagg", 2.0, "a", i, _metrics(ttft=t), sim) for i, t in
          enumerate((40.0, 48.0, 44.0))]
  (group,) = validate.fidelity(rows)
  cell = group["metrics"]["median_ttft_ms"]
  assert cell["spread"] == pytest.approx(8.0 / 44.0)
  assert cell["error"] == pytest.approx(6.0 / 44.0) and cell["within_noise"] is True
  assert cell["within_5pct"] is False
  (single,) = validate.fidelity(rows[:1])
  assert single["metrics"]["median_ttft_ms"]["within_noise"] is None
  summary = validate.fidelity_summary([single])["disagg"]
  assert summary["judged"] == 0 and summary["cells"] == 6 and not summary["goal_met"]
  assert "– (5% ✗)" in validate.fidelity_table([single])
  assert "(6 cells not judged: one real run)" in validate.fidelity_summary_lines([single])[0]


def test_fidelity_groups_by_session_and_old_rows_by_their_simulation():
  rows = _two_runs()
  later = [dict(r, session="s2") for r in rows]
  groups = validate.fidelity(rows + later)
  assert [g["session"] for g in groups] == ["s1", "s2"] and all(g["runs"] == 2 for g in groups)
  assert "| mode | rate | runs | session |" in validate.fidelity_table(groups)
  assert "| colocated | 4 | 2 | s2 | median_ttft_ms |" in validate.fidelity_detail_table(groups)
  assert "session" not in validate.fidelity_table(groups[:1])
  # Rows written before the session was recorded: one group per simulation.
  old = [{k: v for k, v in r.items() if k != "session"} for r in rows]
  other = [dict(r, simulated=_metrics(ttft=41.0)) for r in old]
  assert [g["runs"] for g in validate.fidelity(old + other)] == [2, 2]


def test_fidelity_summary_and_goal():
  sim = _metrics(ttft=41.0, p90_ttft=81.0, tpot=20.0, p90_tpot=25.0, thr=100.0, att=0.85)
  rows = [_run_row("disagg", 6.0, "x", 0, _metrics(), sim),
          _run_row("disagg", 6.0, "x", 1, _metrics(ttft=42.0, p90_ttft=82.0, tpot=20.5,
                                                   p90_tpot=26.0, thr=100.5, att=0.8), sim)]
  groups = validate.fidelity(rows)
  summary = validate.fidelity_summary(groups)["disagg"]
  metrics = summary.pop("metrics")
  # A real run in the simulator's place: TTFT 40 vs 42 (4.8% off) and 42 vs 40 (5%) are within
  # 5%, as are TPOT 20 vs 20.5 and throughput 100 vs 100.5.
  assert summary == {"cells": 6, "judged": 6, "within_noise": 6, "five_pct": 3,
                     "within_5pct": 3, "real_within_5pct": 3.0, "metrics_within": 6,
                     "goal_met": True, "by_metric": {k: [1, 1] for k, _ in validate.COMPARED}}
  # Median TTFT: runs 40 and 42, simulated 41: 1 ms from each run, the runs 2 ms apart.
  assert metrics["median_ttft_ms"]["sim_difference"] == pytest.approx(1.0 / 41.0)
  assert metrics["median_ttft_ms"]["real_difference"] == pytest.approx(2.0 / 41.0)
  assert metrics["slo_attainment"]["sim_difference"] == pytest.approx(5.0)
  assert metrics["slo_attainment"]["real_difference"] == pytest.approx(10.0)
  rows[1]["measured"]["median_ttft_ms"] = 40.0  # spread 0: the simulated 41 is outside it
  summary = validate.fidelity_summary(validate.fidelity(rows))["disagg"]
  assert summary["within_noise"] == 5 and summary["metrics_within"] == 5
  assert not summary["goal_met"] and not summary["metrics"]["median_ttft_ms"]["within"]
  assert summary["by_metric"]["median_ttft_ms"] == [0, 1]


def test_a_real_run_in_the_simulators_place():
  """Each run against the mean of the others, by the simulator's 5% rule: runs 40, 44, 52 are
  16.7%, 4.3% and 23.8% from the others' means (one of three within)."""
  rows = [_run_row("disagg", 6.0, "x", i, _metrics(ttft=t), _metrics(ttft=45.0))
          for i, t in enumerate((40.0, 44.0, 52.0))]
  cell = validate.fidelity(rows)[0]["metrics"]["median_ttft_ms"]
  assert cell["real_within_5pct"] == pytest.approx(1 / 3)
  assert validate.fidelity(rows)[0]["metrics"]["p90_ttft_ms"]["real_within_5pct"] is None
  summary = validate.fidelity_summary(validate.fidelity(rows))["disagg"]
  # TPOT and throughput are equal in every run: within.
  assert summary["real_within_5pct"] == pytest.approx(1 / 3 + 2)
  assert "against the mean of the others: 2.3 of 3)" in validate.fidelity_summary_lines(
      validate.fidelity(rows))[0]
  assert validate.fidelity_summary(validate.fidelity(rows[:1]))["disagg"][
      "real_within_5pct"] is None


def test_fidelity_goal_is_per_metric_over_the_rates():
  """A cell outside its own runs' range does not fail the goal when, over the rates, the
  simulator is still no farther from a real run than the real runs are from each other; a
  bias at every rate does."""
  def rows(sims):
    out = []
    for rate, (runs, sim) in zip((2.0, 4.0, 6.0), sims):
      out += [_run_row("colocated", rate, "s", i, _metrics(ttft=t), _metrics(ttft=sim))
              for i, t in enumerate(runs)]
    return out
  runs = [(40.0, 44.0, 42.0), (50.0, 50.5, 49.5), (60.0, 66.0, 63.0)]
  # Rate 4: 51.5 lies outside 49.5-50.5; the distances from the runs average below the runs'.
  summary = validate.fidelity_summary(validate.fidelity(rows(zip(runs, (42.0, 51.5, 63.0)))))
  s = summary["colocated"]
  assert s["by_metric"]["median_ttft_ms"] == [2, 3]
  assert s["metrics"]["median_ttft_ms"]["within"] and s["goal_met"]
  # 4% high at every rate (runs closer together): outside the noise on the metric, though
  # within 5% everywhere.
  runs = [(41.0, 43.0, 42.0), (49.5, 50.5, 50.0), (62.0, 64.0, 63.0)]
  biased = validate.fidelity_summary(validate.fidelity(rows(zip(runs, (43.7, 52.0, 65.5)))))
  s = biased["colocated"]
  assert s["within_5pct"] == s["five_pct"] and not s["metrics"]["median_ttft_ms"]["within"]
  assert not s["goal_met"] and s["metrics_within"] == 5
  table = validate.fidelity_metric_table(validate.fidelity(rows(zip(runs, (43.7, 52.0, 65.5)))))
  assert "| colocated | median_ttft_ms | " in table and table.count("✗") == 1


def test_the_per_metric_goal_separates_an_exact_simulator_from_a_biased_one():
  """Monte Carlo with normal run-to-run noise, three rates of three real runs: a simulator at
  the engine's true expectation meets the goal on a metric most of the time, one biased by two
  standard deviations of a run rarely does."""
  rng = np.random.default_rng(0)

  def met(bias: float) -> bool:
    rows = []
    for rate in (2.0, 4.0, 6.0):
      real = 50.0 + rng.normal(0.0, 2.0, 3)
      rows += [_run_row("colocated", rate, "s", i, _metrics(ttft=float(t)),
                        _metrics(ttft=50.0 + 2.0 * bias)) for i, t in enumerate(real)]
    summary = validate.fidelity_summary(validate.fidelity(rows))["colocated"]
    return summary["metrics"]["median_ttft_ms"]["within"]
  exact = np.mean([met(0.0) for _ in range(300)])
  biased = np.mean([met(2.0) for _ in range(300)])
  assert exact > 0.85 and biased < 0.1, (exact, biased)


def test_fidelity_markdown():
  rows = _two_runs()
  del rows[0]["measured"]["slo_attainment"]  # no --goodput in one run: attainment not compared
  text = validate.fidelity_markdown(rows)
  assert ("| colocated | 4 | 2 | +4.0% / 9.5% ✓ (5% ✓) | +22.0% / 4.9% ✗ | +2.5% / 0.0% ✗ "
          "(5% ✓) | +0.0% / 0.0% ✓ | +2.9% / 0.1% ✗ (5% ✓) | – |") in text
  assert ("- **colocated**: on 2 of 5 metrics the simulator is no farther from a real run than "
          "the real runs from each other; 3 of 3 medians and throughputs within 5% (a real run "
          "in the simulator's place, against the mean of the others: 2.0 of 3); goal not met. "
          "Per cell, within the range of the real runs: 2 of 5") in text
  assert "| colocated | median_ttft_ms | 4.8% | 9.5% | ✓ |" in text
  assert ("| colocated | 4 | 2 | median_ttft_ms | 40, 44 | 42 | 43.68 | +4.0% | +9.2%, -0.7% | "
          "9.5% | ✓ | ✓ |") in text
  assert validate.fidelity_markdown([]) == ""


def _fidelity_script(repo_root):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "fidelity_launch", os.path.join(repo_root, "launch", "fidelity.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_fidelity_launcher_runs_validate_sim_per_mode(repo_root):
  script = _fidelity_script(repo_root)
  args, rest = script.parse(["--rates=2,4", "--repeats=3", "--output_dir", "/tmp/x"])
  cmds = script.commands(args, rest)
  assert [c[2] for c in cmds] == ["--mode=colocated", "--mode=disagg"]
  assert cmds[0][1].endswith("launch/validate_sim.py")
  assert cmds[0][3:] == ["--devices=4", "--rates=2,4", "--repeats=3", "--output_dir", "/tmp/x"]
  assert cmds[1][3:5] == ["--prefill_devices=2", "--decode_devices=2"]
  assert script.output_dir(rest) == "/tmp/x"
  assert script.output_dir(["--output_dir=/y"]) == "/y"
  args, rest = script.parse(["--modes=disagg", "--disagg_flags=--prefill_devices=1"])
  assert [c[2:4] for c in script.commands(args, rest)] == [["--mode=disagg",
                                                             "--prefill_devices=1"]]
  for bad in (["--modes=single"], ["--mode=colocated"]):
    with pytest.raises(SystemExit):
      script.parse(bad)


def test_a_profile_describes_itself_as_a_table(repo_root):
  """What launch/profile.py prints: every timed shape, in numeric order, in milliseconds."""
  import os
  from disagg_jax.sim.profile import StepProfile
  table = StepProfile.load(os.path.join(repo_root, "docs/results/fidelity/profile_disagg.json"))
  lines = table.describe()
  assert lines[0].startswith(f"disagg step times (ms, medians): decode {table.decode_s * 1e3:.2f}")
  transfer = lines[lines.index("transfer  (length bucket: ms)") + 1:][:len(table.transfer_s)]
  assert [int(l.split()[0]) for l in transfer] == sorted(table.transfer_s)
  assert len([l for l in lines if l.startswith("  batch ")]) == len(table.prefill_s)
