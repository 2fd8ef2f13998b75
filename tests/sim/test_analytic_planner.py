"""The roofline model's arithmetic, the anchor fit, and the planner's search."""

import numpy as np
import pytest

from disagg_jax.sim import analytic, planner
from disagg_jax.testing.profiles import colocated_profile, disagg_profile


@pytest.fixture(scope="module")
def llama8b():
  return analytic.model_preset("llama3_8b")


def test_presets_match_published_sizes(llama8b):
  assert llama8b.num_params() == pytest.approx(8.03e9, rel=0.01)
  assert analytic.model_preset("llama3_70b").num_params() == pytest.approx(70.6e9, rel=0.01)
  with pytest.raises(ValueError, match="llama3_8b"):
    analytic.model_preset("gpt5")
  with pytest.raises(ValueError, match="v5e"):
    analytic.get_hardware("a100")


def test_decode_is_memory_bound_and_prefill_compute_bound(llama8b):
  hw = analytic.get_hardware("v5e")
  # Decode at batch 1: ~16 GB of weights over 8 chips at 819 GB/s x MBU.
  t = analytic.step_time(analytic.decode_cost(llama8b, 1, 0), llama8b, hw, 8)
  weights = llama8b.num_params() * 2
  assert t > weights / (8 * hw.hbm_bw * hw.mbu)
  assert t == pytest.approx(weights / (8 * hw.hbm_bw * hw.mbu), rel=0.5)
  # Prefill of 4 x 2048 tokens: ~2 x 7B x 8192 FLOPs dominate.
  cost = analytic.prefill_cost(llama8b, 4, 2048)
  assert cost.flops / (hw.peak_flops * hw.mfu) > cost.bytes / (hw.hbm_bw * hw.mbu)


def test_anchor_fit_reproduces_the_anchor(llama8b):
  hw = analytic.get_hardware("h200")
  for batch, ctx, seconds in analytic.H200_ANCHOR["decode"]:
    t = analytic.step_time(analytic.decode_cost(llama8b, batch, batch * ctx), llama8b, hw, 1)
    assert t == pytest.approx(seconds, rel=0.02)
  b, s, seconds = analytic.H200_ANCHOR["prefill"]
  t = analytic.step_time(analytic.prefill_cost(llama8b, b, s), llama8b, hw, 1)
  assert t == pytest.approx(seconds, rel=0.05)


def test_memory_limits(llama8b):
  v5e = analytic.get_hardware("v5e")
  assert not analytic.fits(llama8b, v5e, 1, 32, 2048)[0]  # 16 GB of weights on a 16 GB chip
  ok, pages = analytic.fits(llama8b, v5e, 4, 32, 2048)
  assert ok and 0 < pages <= 32 * 2048 // 16
  with pytest.raises(ValueError, match="no room"):
    analytic.profile_for(llama8b, v5e, mode="disagg", tp=1, decode_batch=8, max_seq_len=2048)


def _workload(prompt, output, n=60):
  rng = np.random.default_rng(0)
  return planner.Workload(rng.integers(prompt // 2, prompt * 3 // 2, n),
                          rng.integers(output // 2, output * 3 // 2, n),
                          {"ttft": 0.5, "tpot": 0.05})


def test_planner_ranks_by_simulated_goodput(llama8b):
  hw = analytic.get_hardware("h100")
  ranked, screened = planner.plan(llama8b, hw, 4, _workload(512, 64), simulate_top=8)
  assert screened > 300
  assert [p.goodput_per_device for p in ranked] == sorted(
      (p.goodput_per_device for p in ranked), reverse=True)
  best = ranked[0]
  assert best.goodput > 0 and best.metrics["slo_attainment"] >= 0.9
  assert best.candidate.devices <= 4
  row = best.to_json()
  for key in ("mode", "prefill_devices", "decode_devices", "prefill_tp", "decode_tp",
              "num_prefill_workers", "num_decode_workers", "goodput_per_device"):
    assert key in row


def test_goodput_is_the_rate_where_attainment_crosses_90_percent(llama8b):
  hw = analytic.get_hardware("h100")
  workload = _workload(512, 64)
  c = planner.Candidate("disagg", 1, 1, 1, 1, 1, 64, prefill_batch=4)
  profile = planner.unit_profile(c, llama8b, hw, workload.max_seq_len)
  estimate = planner.screen(c, profile, workload)
  rate, _ = planner.goodput(c, profile, workload, estimate)
  assert planner.attainment(c, profile, workload, rate)[0] >= 0.9
  assert planner.attainment(c, profile, workload, rate * 1.5)[0] < 0.9


def test_prefill_heavy_gets_more_prefill_chips_than_decode_heavy(llama8b):
  hw = analytic.get_hardware("h100")
  share = {}
  for name, (prompt, output) in {"prefill": (1500, 16), "decode": (64, 400)}.items():
    ranked, _ = planner.plan(llama8b, hw, 8, _workload(prompt, output), simulate_top=12,
                             modes=("disagg",))
    c = ranked[0].candidate
    share[name] = c.num_prefill_workers * c.prefill_tp / c.unit_devices
  assert share["prefill"] > share["decode"]


def test_plan_over_measured_tables_ranks_every_covered_configuration():
  flags = {"mode": "colocated", "devices": "4", "tp": 2, "config.engine.decode_batch": 4}
  col = colocated_profile(meta={"flags": flags})
  dis = disagg_profile(meta={"flags": {"mode": "disagg", "prefill_devices": "1",
                                       "decode_devices": "0,1,2", "prefill_tp": 0,
                                       "decode_tp": 1}})
  candidates = planner.profile_candidates([col, dis])
  # colocated: chunk batches (1, 2) x chunk sizes (32, 64, 128); disagg: prefill batches 1, 2
  assert len(candidates) == 2 * 3 + 2
  c, table, run_flags = candidates[0]
  assert c.devices == 4 and c.decode_dp == 2
  assert run_flags["config.engine.chunk_size"] == c.chunk_size == table.chunk_size
  c, table, run_flags = candidates[-1]
  assert (c.prefill_tp, c.decode_tp, c.decode_dp, c.devices) == (1, 1, 3, 4)
  assert run_flags["config.engine.prefill_batch"] == 2
  ranked, count = planner.plan_profiles([col, dis], _workload(100, 8, n=40))
  assert count == 8
  assert [p.goodput_per_device for p in ranked] == sorted(
      (p.goodput_per_device for p in ranked), reverse=True)
  assert ranked[0].goodput > 0 and ranked[0].to_json()["flags"]["mode"] in ("colocated",
                                                                            "disagg")
  with pytest.raises(ValueError, match="engine flags"):
    planner.profile_candidates([colocated_profile()])
