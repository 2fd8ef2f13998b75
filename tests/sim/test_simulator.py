"""The simulator against hand-computed timelines, and against its own invariants."""

import numpy as np
import pytest

from disagg_jax.bench import metrics
from disagg_jax.sim import simulator
from disagg_jax.sim.profile import StepProfile


def colocated_profile(**kw):
  base = dict(mode="colocated", page_size=16, decode_batch=4, num_pages=64, max_seq_len=512,
              decode_s=0.01, chunk_size=128, chunk_batch=2,
              mixed_s={(b, c): 0.05 for b in (1, 2) for c in (16, 32, 64, 128)})
  base.update(kw)
  return StepProfile(**base)


def disagg_profile(**kw):
  lb = (16, 32, 64, 128, 256, 512)
  base = dict(mode="disagg", page_size=16, decode_batch=4, num_pages=128, max_seq_len=512,
              decode_s=0.01, prefill_batch=2, length_buckets=lb,
              prefill_s={(b, s): 0.05 * b for b in (1, 2) for s in lb},
              insert_s={s: 0.005 for s in lb}, transfer_s={s: 0.02 for s in lb})
  base.update(kw)
  return StepProfile(**base)


def test_colocated_single_request_timeline():
  # 200 prompt tokens: chunks of 128 and 72 (two mixed steps of 50 ms), first token at 0.10,
  # then one decode step (10 ms) per token.
  result = simulator.simulate(colocated_profile(), [200], [3], [0.0])
  (record,) = result.records
  assert record.ttft == pytest.approx(0.10)
  assert record.itl == pytest.approx([0.01, 0.01])
  assert record.e2el == pytest.approx(0.12)
  assert record.tpot == pytest.approx(0.01)
  assert record.phases["queue"] == pytest.approx(0.0)
  assert record.phases["prefill"] == pytest.approx(0.10)


def test_colocated_prefill_stalls_decode_in_mixed_steps():
  # The first request decodes 0.05 -> 0.06; the second arrives at 0.055, is admitted at 0.06 and
  # its chunk rides in the next step, which is a 50 ms mixed step for the first request too.
  result = simulator.simulate(colocated_profile(), [100, 100], [3, 2], [0.0, 0.055])
  first, second = result.records
  assert first.ttft == pytest.approx(0.05)
  assert first.itl == pytest.approx([0.01, 0.05])
  assert second.ttft == pytest.approx(0.11 - 0.055)
  assert second.phases["queue"] == pytest.approx(0.005)


def test_disagg_single_request_timeline():
  # prefill 50 ms -> transfer 20 ms -> insert 5 ms -> decode steps of 10 ms.
  result = simulator.simulate(disagg_profile(), [200], [3], [0.0])
  (record,) = result.records
  assert record.ttft == pytest.approx(0.05)
  assert record.itl == pytest.approx([0.035, 0.01])
  assert record.phases["transfer"] == pytest.approx(0.02)
  assert record.e2el == pytest.approx(0.095)


def test_disagg_batches_same_bucket_and_queues_the_rest():
  # Three arrivals at once, two in the 256 bucket and one in 64: the head's bucket is batched
  # (2 x 50 ms), the other waits for the next prefill step.
  result = simulator.simulate(disagg_profile(), [200, 60, 210], [1, 1, 1], [0.0, 0.0, 0.0])
  ttfts = [r.ttft for r in result.records]
  assert ttfts == pytest.approx([0.10, 0.15, 0.10])


def test_contention_slows_overlapping_steps():
  calm = simulator.simulate(disagg_profile(), [100, 100], [20, 1], [0.0, 0.1])
  busy = simulator.simulate(disagg_profile(contention={"prefill": 2.0, "decode": 1.5}),
                            [100, 100], [20, 1], [0.0, 0.1])
  # The second prefill overlaps the first request's decoding: twice as long.
  assert busy.records[1].ttft == pytest.approx(2 * calm.records[1].ttft)
  assert busy.records[0].e2el > calm.records[0].e2el


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_many_requests_invariants(mode):
  rng = np.random.default_rng(0)
  n = 300
  prompts = rng.integers(1, 400, n)
  outputs = rng.integers(1, 60, n)
  arrivals = np.cumsum(rng.exponential(0.02, n))
  profile = colocated_profile() if mode == "colocated" else disagg_profile()
  result = simulator.simulate(profile, prompts, outputs, arrivals)
  assert len(result.records) == n
  for record, want in zip(result.records, outputs):
    assert record.success and record.output_len == want
    assert 0 < record.ttft <= record.e2el
    assert sum(record.phases.values()) == pytest.approx(record.e2el)
  out = metrics.compute(result.records, result.duration)
  assert out["completed"] == n
  assert out["output_throughput"] * out["duration"] == pytest.approx(sum(outputs))


def test_profile_json_round_trip(tmp_path):
  profile = disagg_profile(meta={"device": "cpu"})
  path = str(tmp_path / "p.json")
  profile.save(path)
  assert StepProfile.load(path) == profile
  (tmp_path / "bad.json").write_text("{not json")
  with pytest.raises(ValueError, match="bad.json"):
    StepProfile.load(str(tmp_path / "bad.json"))


def test_xpyd_more_decode_workers_hold_more_sequences():
  # Decode-bound load: 2 decode workers double the slots, so TPOT-bound queueing shrinks; 2
  # prefill workers halve TTFT under a prefill-bound load.
  rng = np.random.default_rng(1)
  n = 120
  arrivals = np.cumsum(rng.exponential(0.01, n))
  decode_bound = [simulator.simulate(disagg_profile(), [32] * n, [80] * n, arrivals,
                                     num_decode_workers=y) for y in (1, 2)]
  e2el = [np.mean([r.e2el for r in res.records]) for res in decode_bound]
  assert e2el[1] < 0.7 * e2el[0]
  prefill_bound = [simulator.simulate(disagg_profile(), [300] * n, [1] * n, arrivals,
                                      num_prefill_workers=x) for x in (1, 2)]
  ttft = [np.mean([r.ttft for r in res.records]) for res in prefill_bound]
  assert ttft[1] < 0.6 * ttft[0]


def test_colocated_read_lag_delays_every_token():
  # Tokens reach requests read_lag_s after their step: TTFT and E2EL move, the cadence does not.
  profile = colocated_profile(read_lag_s=0.004)
  (record,) = simulator.simulate(profile, [100], [3], [0.0]).records
  assert record.ttft == pytest.approx(0.054)
  assert record.itl == pytest.approx([0.01, 0.01])
  assert record.e2el == pytest.approx(0.074)
