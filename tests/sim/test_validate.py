"""How simulated-against-measured errors are computed and tabulated."""

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
