"""The elastic controller on hand-made signal sequences, and driving the simulator."""

import dataclasses

import numpy as np
import pytest

from disagg_jax.sched.elastic import (TO_DECODE, TO_PREFILL, ElasticConfig, ElasticController,
                                      Signals)

CONFIG = ElasticConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, window_s=5.0, patience=2, switch_s=10.0)


def signals(t, *, queued=0, ttft=1.0, tpot=1.0, slots=0.3, pages=0.3, prefill=2, decode=2,
            busy=0.3, **arriving):
  return Signals(time=t, prefill_workers=prefill, decode_workers=decode,
                 queued_prefill_tokens=queued, prefill_tokens_per_s=10_000.0, prefill_busy=busy,
                 decode_slot_use=slots, decode_page_use=pages, ttft_attainment=ttft,
                 tpot_attainment=tpot, **arriving)


PREFILL_PRESSURE = dict(queued=50_000, ttft=0.5)  # 5 s of backlog, TTFT attainment 50%
DECODE_PRESSURE = dict(tpot=0.4, pages=0.95)


def test_a_move_needs_patience_windows_in_a_row():
  c = ElasticController(CONFIG)
  assert c.decide(signals(5, **PREFILL_PRESSURE)) is None  # one window: hold
  assert c.decide(signals(10)) is None  # the pressure went away: the streak restarts
  assert c.decide(signals(15, **PREFILL_PRESSURE)) is None
  assert c.decide(signals(20, **PREFILL_PRESSURE)) == TO_PREFILL
  assert [d.action for d in c.log] == [None, None, None, TO_PREFILL]
  assert "asked 1 of 2 windows" in c.log[0].reason and "backlog 5.00 s" in c.log[3].reason
  assert c.log[3].signals.queued_prefill_tokens == 50_000  # every decision keeps its signals


def test_no_flapping_the_cost_of_a_move_is_respected():
  c = ElasticController(CONFIG)
  assert CONFIG.cooldown == 2 * 10.0 + 5.0
  for t in (5, 10):
    c.decide(signals(t, **PREFILL_PRESSURE))
  assert c.log[-1].action == TO_PREFILL
  # The traffic flips at once: a reversal waits for the cooldown and one more window.
  actions = [c.decide(signals(t, prefill=3, decode=1, **DECODE_PRESSURE, slots=0.5))
             for t in range(15, 75, 5)]
  first = 15 + 5 * actions.index(TO_DECODE)
  assert first >= 10 + CONFIG.cooldown
  moves = [d.time for d in c.log if d.action is not None]
  assert all(b - a >= CONFIG.cooldown for a, b in zip(moves, moves[1:]))  # however pressed
  reasons = [d.reason for d in c.log]
  assert any("asked 2 of 3 windows" in r for r in reasons)  # a reversal: patience + 1
  assert any("cooling down" in r for r in reasons)


def test_no_move_when_both_sides_or_neither_are_pressed_or_a_side_would_empty():
  c = ElasticController(CONFIG)
  for t in range(5, 60, 5):
    assert c.decide(signals(t, **PREFILL_PRESSURE, **DECODE_PRESSURE)) is None
    assert c.decide(signals(t + 0.1)) is None
  c = ElasticController(CONFIG)  # the decode side keeps its minimum
  assert all(c.decide(signals(t, decode=1, **PREFILL_PRESSURE)) is None for t in range(5, 60, 5))
  c = ElasticController(CONFIG)  # nor gives up a worker it needs for what it holds
  assert all(c.decide(signals(t, slots=0.6, **PREFILL_PRESSURE)) is None for t in range(5, 60, 5))
  c = ElasticController(CONFIG)  # nor a prefill worker the prefill side needs to keep up
  assert all(c.decide(signals(t, busy=0.5, **DECODE_PRESSURE)) is None for t in range(5, 60, 5))
  assert c.decide(signals(60, busy=0.4, **DECODE_PRESSURE)) is None  # (a new streak)
  assert c.decide(signals(65, busy=0.4, **DECODE_PRESSURE)) == TO_DECODE
  with pytest.raises(ValueError, match="switch_s=0 must be positive"):
    ElasticConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, switch_s=0)
  with pytest.raises(ValueError, match=r"min_gain=1 must be in \[0, 1\)"):
    ElasticConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, min_gain=1)


def test_the_simulator_moves_workers_with_the_traffic_and_loses_nothing():
  from disagg_jax.bench import timed
  from disagg_jax.sim import analytic, simulator
  cfg, hw = analytic.model_preset("llama3_8b"), analytic.get_hardware("h100")
  profile = analytic.profile_for(cfg, hw, mode="disagg", tp=1, prefill_tp=1, decode_batch=64,
                                 max_seq_len=8192, prefill_batch=4)
  requests, arrivals = timed.shifting(timed.parse_phases("4k_256:40:40,1k_1k:60:16"),
                                      request_rate=1.0, burstiness=1.0, vocab_size=1000, seed=0)
  prompt_lens = [len(r.prompt_token_ids) for r in requests]
  output_lens = [r.output_len for r in requests]
  controller = ElasticController(ElasticConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, window_s=2.0,
                                               switch_s=4.0))
  result = simulator.simulate_disagg(profile, prompt_lens, output_lens, arrivals,
                                     num_prefill_workers=2, num_decode_workers=6,
                                     elastic=controller, devices_per_worker=1)
  assert len(result.records) == len(requests)
  assert all(r.success and r.output_len == n for r, n in zip(result.records, output_lens))
  timeline = np.asarray(result.split_timeline)
  assert list(timeline[0]) == [0.0, 2, 6] and result.split_changes >= 2
  assert (timeline[:, 1] + timeline[:, 2] <= 8).all() and (timeline[:, 1:] >= 1).all()
  # Long prompts first: prefill grows; then long answers: decode grows back.
  assert timeline[:, 1].max() > 2
  late = timeline[timeline[:, 0] > 45]
  assert len(late) and late[-1, 2] > timeline[timeline[:, 0] <= 45][-1, 2]
  assert result.decisions and all("signals" in d for d in result.decisions)


def test_the_simulator_changes_tensor_parallelism_with_the_traffic():
  """8 x v5e, Llama-3-8B: from 2P(TP2) + 1D(TP4) to three TP2 prefill workers for long prompts
  (the TP4 decode worker becomes a TP2 prefill and a TP2 decode worker), toward decode for long
  answers, and back. Whatever a leaving decode worker does with its sequences (drain, migrate
  their KV, or have them recomputed), every request completes and the chips in service never
  exceed eight; migrating moves sequences, recomputing restarts them."""
  from disagg_jax.bench import timed
  from disagg_jax.sim import analytic, simulator
  from disagg_jax.sim.simulator import Split
  cfg = analytic.model_preset("llama3_8b")
  hw = analytic.get_hardware("v5e")
  profiles = {}

  def profile_of(ptp, dtp):
    if (ptp, dtp) not in profiles:
      profiles[ptp, dtp] = analytic.profile_for(
          cfg, hw, mode="disagg", tp=dtp, prefill_tp=ptp, decode_batch=128,
          max_seq_len=8192, prefill_batch=8)
    return profiles[ptp, dtp]

  splits = [Split(2, 2, 1, 3), Split(2, 2, 2, 2), Split(2, 2, 3, 1), Split(2, 4, 2, 1),
            Split(4, 2, 1, 2), Split(4, 4, 1, 1)]
  requests, arrivals = timed.shifting(timed.parse_phases("4k_256:60:3.3,1k_1k:60:6,4k_256:60:3.3"),
                                      request_rate=1.0, burstiness=1.0, vocab_size=1000, seed=0)
  output_lens = [r.output_len for r in requests]
  results = {}
  for on_move in simulator.MOVES:
    controller = ElasticController(ElasticConfig(ttft_slo_s=1.2, tpot_slo_s=0.045, window_s=5.0,
                                                 switch_s=5.0, min_gain=0.1))
    result = results[on_move] = simulator.simulate_disagg(
        profile_of(2, 4), [len(r.prompt_token_ids) for r in requests], output_lens, arrivals,
        num_prefill_workers=2, num_decode_workers=1, elastic=controller, splits=splits,
        profile_of=profile_of, on_move=on_move)
    assert all(r.success and r.output_len == n for r, n in zip(result.records, output_lens))
    timeline = np.asarray(result.split_timeline)
    assert list(timeline[0]) == [0.0, 4, 4]
    assert (timeline[:, 1] + timeline[:, 2] <= 8).all()
    targets = [tuple(d["target"]) for d in result.decisions if d["action"]]
    assert targets[0] == (2, 2, 3, 1)  # long prompts: the TP4 decode worker split in two
    assert targets[1] == (2, 4, 2, 1)  # long answers: a TP4 decode worker again
    if on_move != "drain":  # (draining 1k-token answers delays the way back)
      assert targets[2] == (2, 2, 3, 1)  # long prompts again
  assert results["drain"].migrations == results["recompute"].migrations == 0
  assert results["migrate"].migrations > 0
  assert results["recompute"].preemptions > results["drain"].preemptions
  with pytest.raises(ValueError, match="on_move='move' is not one of drain, migrate, recompute"):
    simulator.simulate_disagg(profile_of(2, 4), [10], [10], [0.0], num_prefill_workers=2,
                              num_decode_workers=1, elastic=controller, splits=splits,
                              profile_of=profile_of, on_move="move")


def test_the_controller_chooses_among_split_options():
  """Rate matching over explicit options: the least busy busier side wins, a gain under
  `min_gain` holds, and with no arrivals a pressured side gets the nearest option its way."""
  from disagg_jax.sched.elastic import RESHAPE, SplitOption
  options = [SplitOption(("a",), 2, 6, 10_000, 6_000), SplitOption(("b",), 4, 4, 20_000, 6_000),
             SplitOption(("c",), 4, 4, 20_000, 3_000), SplitOption(("d",), 6, 2, 30_000, 1_500)]
  arriving = dict(arriving_prompt_tokens_per_s=18_000.0, arriving_output_tokens_per_s=1_000.0)
  c = ElasticController(dataclasses.replace(CONFIG, patience=1, min_gain=0.1))
  assert c.decide(signals(5, **arriving), options, ("b",)) == TO_PREFILL  # b: 0.9, d: 0.67
  assert c.log[-1].target == ("d",) and c.log[-1].count == 2
  c = ElasticController(dataclasses.replace(CONFIG, patience=1, min_gain=0.3))
  assert c.decide(signals(5, **arriving), options, ("b",)) is None  # 26% less busy: not enough
  c = ElasticController(dataclasses.replace(CONFIG, patience=1))
  # The same devices, another TP: decode holds more at the same prefill rate.
  assert c.decide(signals(5, arriving_prompt_tokens_per_s=10_000.0,
                          arriving_output_tokens_per_s=5_000.0), options, ("c",)) == RESHAPE
  assert c.log[-1].target == ("b",)
  c = ElasticController(dataclasses.replace(CONFIG, patience=1))
  assert c.decide(signals(5, **PREFILL_PRESSURE), options, ("a",)) == TO_PREFILL
  assert c.log[-1].target[0] in ("b", "c")  # the nearest toward prefill


def test_rate_matching_keeps_ttft_headroom_fits_the_kv_held_and_averages_arrivals():
  from disagg_jax.sched.elastic import SplitOption, prefill_utilization
  # M/D/1 with a 90th-percentile wait of ln 10 x the mean: a prompt of 0.5 s under a 2 s SLO
  # leaves rho / (1 - rho) = 2 x 1.5 / (2.3026 x 0.5) = 2.606, rho = 0.723.
  assert prefill_utilization(0.5, 2.0) == pytest.approx(2.606 / 3.606, rel=1e-3)
  assert prefill_utilization(0.1, 2.0) > 0.9 and prefill_utilization(3.0, 2.0) == 0.05
  assert prefill_utilization(0.5, float("inf")) == 1.0
  # Two prefill workers at 10k tokens/s each, prompts of 5k tokens (0.5 s): 14k tokens/s is 70%
  # of their capacity but 97% of what keeps TTFT within 2 s; three workers: 65%.
  two = SplitOption(("two",), 2, 2, 20_000, 4_000, 2)
  three = SplitOption(("three",), 3, 1, 30_000, 2_000, 3)
  assert two.load(14_000, 1_000) == pytest.approx(0.7)
  assert two.load(14_000, 1_000, 5_000, 2.0) == pytest.approx(0.7 / 0.723, rel=1e-3)
  assert three.load(14_000, 1_000, 5_000, 2.0) == pytest.approx(0.467 / 0.723, rel=1e-2)
  window = dict(arriving_prompt_tokens_per_s=14_000.0, arriving_output_tokens_per_s=1_000.0,
                arriving_requests_per_s=2.8)
  c = ElasticController(dataclasses.replace(CONFIG, ttft_slo_s=2.0, patience=1, min_gain=0.1))
  assert c.decide(signals(5, **window), [two, three], ("two",)) == TO_PREFILL
  # ... unless the decode side it would leave could not hold the KV decoding now.
  small = dataclasses.replace(three, decode_pages=1_000)
  c = ElasticController(dataclasses.replace(CONFIG, ttft_slo_s=2.0, patience=1, min_gain=0.1))
  assert c.decide(signals(5, **window, decode_pages_used=950), [two, small], ("two",)) is None
  assert c.decide(signals(10, **window, decode_pages_used=500), [two, small], ("two",)) == (
      TO_PREFILL)
  # The arrival rates are a moving average: one quiet window halves them, it does not zero them.
  c = ElasticController(CONFIG)
  assert c.arriving(signals(5, **window)) == (14_000.0, 1_000.0, 2.8)
  assert c.arriving(signals(10)) == (7_000.0, 500.0, 1.4)
