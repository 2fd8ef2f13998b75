"""The elastic controller on hand-made signal sequences, and driving the simulator."""

import numpy as np
import pytest

from disagg_jax.sched.elastic import (TO_DECODE, TO_PREFILL, ElasticConfig, ElasticController,
                                      Signals)

CONFIG = ElasticConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, window_s=5.0, patience=2, switch_s=10.0)


def signals(t, *, queued=0, ttft=1.0, tpot=1.0, slots=0.3, pages=0.3, prefill=2, decode=2,
            busy=0.3):
  return Signals(time=t, prefill_workers=prefill, decode_workers=decode,
                 queued_prefill_tokens=queued, prefill_tokens_per_s=10_000.0, prefill_busy=busy,
                 decode_slot_use=slots, decode_page_use=pages, ttft_attainment=ttft,
                 tpot_attainment=tpot)


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
