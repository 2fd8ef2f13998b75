"""The simulator against hand-computed timelines, and against its own invariants."""

import numpy as np
import pytest

from disagg_jax.bench import metrics
from disagg_jax.sim import contention, simulator
from disagg_jax.sim.profile import StepProfile
from disagg_jax.testing.profiles import colocated_profile, disagg_profile


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
  # The loop runs one step ahead, as the engine's does: the first request's chunk runs 0 -> 0.05
  # and its first decode step, dispatched at once, 0.05 -> 0.06; at 0.05 (reading the chunk's
  # token) the loop plans the step after, 0.06 -> 0.11. The second request arrived at 0.045, so
  # it is admitted then and its chunk makes that a 50 ms mixed step for the first request too.
  result = simulator.simulate(colocated_profile(), [100, 100], [3, 2], [0.0, 0.045])
  first, second = result.records
  assert first.ttft == pytest.approx(0.05)
  assert first.itl == pytest.approx([0.01, 0.05])
  assert second.ttft == pytest.approx(0.11 - 0.045)
  assert second.phases["queue"] == pytest.approx(0.005)


def test_colocated_without_run_ahead_admits_an_arrival_one_step_sooner():
  # As above with --config.engine.run_ahead=false: the chunk's token is read at 0.05 before the
  # next step is decided, so the second request (arrived at 0.045) joins the step at 0.05 and no
  # decode step runs in between.
  result = simulator.simulate(colocated_profile(run_ahead=False), [100, 100], [3, 2],
                              [0.0, 0.045])
  first, second = result.records
  assert first.ttft == pytest.approx(0.05)
  assert first.itl == pytest.approx([0.05, 0.01])
  assert second.ttft == pytest.approx(0.10 - 0.045)


def test_disagg_staging_budget_bounds_the_prefill_batch():
  # The batch of the test below under a staging budget of one 256-token bucket: the head goes
  # alone, then the 64-bucket prompt (the head's reservation ends with its one token), then the
  # other 256 one. The default (0: the longest bucket, 512) batches both 256s.
  def ttfts(staging):
    result = simulator.simulate(disagg_profile(staging_tokens=staging), [200, 60, 210],
                                [1, 1, 1], [0.0, 0.0, 0.0])
    return [r.ttft for r in result.records]
  assert ttfts(256) == pytest.approx([0.05, 0.10, 0.15])
  assert ttfts(0) == ttfts(512) == pytest.approx([0.10, 0.15, 0.10])


def test_disagg_decode_loop_wakes_slowly_after_sleeping():
  # A request a second after the last one ended: the prefill worker finds the engine idle and
  # wakes 10 ms late (the wake table's longest idle, beyond which it stays flat); the decode loop
  # slept as long and takes as long again before it inserts the KV.
  def second(wake_s):
    result = simulator.simulate(disagg_profile(wake_s=wake_s), [200, 200], [3, 3], [0.0, 1.0])
    return result.records[1]
  cold, warm = second([[0.1, 0.01]]), second([])
  assert cold.ttft - warm.ttft == pytest.approx(0.01)
  assert cold.itl[0] - warm.itl[0] == pytest.approx(0.01)
  assert cold.itl[1] == pytest.approx(warm.itl[1])


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


def test_disagg_read_lag_delays_the_first_token_and_the_handoff():
  # The first token reaches the request read_lag_s after the prefill step, and the KV leaves
  # then: every later token moves by the lag too.
  (plain,) = simulator.simulate(disagg_profile(), [200], [3], [0.0]).records
  (lagged,) = simulator.simulate(disagg_profile(read_lag_s=0.004), [200], [3], [0.0]).records
  assert lagged.ttft == pytest.approx(plain.ttft + 0.004)
  assert lagged.e2el == pytest.approx(plain.e2el + 0.004)
  assert lagged.itl == pytest.approx(plain.itl)


def test_prefill_contention_grows_with_decoding_sequences():
  # A prefill that starts while 1 sequence decodes is slowed by 1.5 + 0.25; with the per-sequence
  # term zero, by 1.5 alone.
  base = {"prefill": 1.5, "decode": 1.0}
  args = ([100, 100], [40, 1], [0.0, 0.1])
  flat = simulator.simulate(disagg_profile(contention=base), *args).records[1]
  grows = simulator.simulate(disagg_profile(contention={**base, "prefill_per_seq": 0.25}),
                             *args).records[1]
  assert flat.ttft == pytest.approx(1.5 * 0.05)
  assert grows.ttft == pytest.approx(1.75 * 0.05)


def test_restricted_profile_keeps_the_smaller_buckets():
  col = colocated_profile()
  small = col.restricted(chunk_size=32, chunk_batch=1)
  assert small.chunk_size == 32 and small.chunk_batch == 1
  assert set(small.mixed_s) == {(1, 32)}
  assert small.mixed(1, 20) == col.mixed(1, 20)
  with pytest.raises(ValueError, match="chunk_size=48"):
    col.restricted(chunk_size=48)
  with pytest.raises(ValueError, match="chunk_batch=3"):
    col.restricted(chunk_batch=3)
  dis = disagg_profile().restricted(prefill_batch=1)
  assert dis.prefill_batch == 1 and {b for b, _ in dis.prefill_s} == {1}
  with pytest.raises(ValueError, match="prefill_batch=4"):
    disagg_profile().restricted(prefill_batch=4)


def test_a_data_parallel_prefill_table_prices_batches_in_multiples_of_dp():
  # Prefill mesh of 3 dp rows, prefill batch 4: the engine's batches are 3 or 6 prompts.
  lb = (16, 32, 64, 128, 256, 512)
  dis = disagg_profile(prefill_batch=4, prefill_dp=3, decode_batch=6,
                       prefill_s={**{(3, s): 0.05 for s in lb}, **{(6, s): 0.08 for s in lb}})
  assert dis.prefill_batches() == (3, 6)
  assert dis.prefill(1, 64) == dis.prefill(3, 64) == pytest.approx(0.05)
  assert dis.prefill(4, 64) == pytest.approx(0.08)
  for batch in (1, 2):  # both run one prompt per row
    assert set(dis.restricted(prefill_batch=batch).prefill_s) == {(3, s) for s in lb}
  result = simulator.simulate(dis, [40] * 8, [6] * 8, [0.0] * 8)
  assert len(result.records) == 8
  # Six prompts that arrive together leave in one prefill step: equal first-token times.
  assert len({round(r.ttft, 9) for r in result.records[:6]}) == 1


def _served_by(truth: StepProfile, seed: int) -> list[tuple]:
  """Two "served" runs (24 requests at 3 and 9 req/s) simulated with the `truth` table, in the
  form `sim.contention`'s fits take them."""
  from disagg_jax.bench import arrivals as arrivals_lib
  served = []
  rng = np.random.default_rng(seed)
  for rate in (3.0, 9.0):
    prompts, outputs = rng.integers(16, 256, 24), np.full(24, 24)
    arrivals = arrivals_lib.arrival_times(24, rate, 1.0, 0)
    result = simulator.simulate(truth, prompts, outputs, arrivals)
    measured = metrics.compute(result.records, result.duration)
    measured.update(contention.targets(truth.mode, truth.chunk_size, result.records,
                                       result.duration))
    measured["request_rate"] = rate
    served.append((prompts, outputs, arrivals, measured))
  return served


@pytest.mark.parametrize("decode", [pytest.param(1.25, marks=pytest.mark.slow),
                                    2.75])  # 2.75: past the first grid's edge (2.0)
def test_fit_contention_recovers_the_factors_of_a_simulated_run(decode):
  from disagg_jax.sim import contention
  truth = {"prefill": 1.5, "prefill_per_seq": 0.1, "decode": decode}
  served = _served_by(disagg_profile(decode_batch=16, contention=truth), seed=3)
  factors, record = contention.fit_contention(disagg_profile(decode_batch=16), served)
  for row in record:
    assert row["fitted_median_ttft_ms"] == pytest.approx(row["measured_median_ttft_ms"],
                                                         rel=0.02)
    assert row["fitted_median_tpot_ms"] == pytest.approx(row["measured_median_tpot_ms"],
                                                         rel=0.02)
  assert factors["decode"] == pytest.approx(decode, abs=0.05)


def test_fit_served_recovers_the_served_decode_cadence_mixed_steps_and_read_lag_colocated():
  # Runs simulated with decode steps 1.25x the table's, mixed steps 0.8x and tokens read 6 ms
  # after their step (the table says 1 ms): fitting the table to those runs finds all three
  # again. The lag and the mixed steps both move TTFT; prompts of one chunk and of two (16 to
  # 256 tokens, chunks of 128) tell them apart.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import contention
  table = dataclasses.replace(colocated_profile(decode_batch=16), read_lag_s=0.001)
  truth = dataclasses.replace(contention.scale_mixed(contention.scale_decode(table, 1.25), 0.8),
                              read_lag_s=0.006)
  served = _served_by(truth, seed=5)
  fitted = contention.fit_served(table, served)
  assert fitted.meta["served_decode_factor"] == pytest.approx(1.25, abs=0.03)
  assert fitted.meta["served_mixed_factor"] == pytest.approx(0.8, abs=0.03)
  assert fitted.read_lag_s == pytest.approx(0.006, abs=0.001)
  assert fitted.meta["probe_read_lag_s"] == 0.001
  assert fitted.meta["served_fit_rounds"] == 1
  assert fitted.decode_s == pytest.approx(0.01 * fitted.meta["served_decode_factor"], rel=1e-3)
  assert fitted.mixed_s[(1, 128)] == pytest.approx(0.05 * fitted.meta["served_mixed_factor"],
                                                   rel=1e-3)
  for row in fitted.meta["served_fit"]:
    for key in contention.COLOCATED_KEYS:
      assert row[f"fitted_{key}"] == pytest.approx(row[f"measured_{key}"], rel=0.02)


def test_fit_targets_split_colocated_ttft_by_chunks():
  # A 100-token prompt takes one 128-token chunk, a 200-token one two: their medians are
  # reported apart (colocated only), and a group with no request is left out.
  from disagg_jax.sim import contention
  records = [metrics.RequestRecord(prompt_len=n, output_len=2, success=True, ttft=t,
                                   itl=[0.01], e2el=t + 0.01)
             for n, t in ((100, 0.03), (120, 0.05), (200, 0.08), (250, 0.1))]
  got = contention.targets("colocated", 128, records, 1.0)
  assert got["median_ttft_one_chunk_ms"] == pytest.approx(40.0)
  assert got["median_ttft_more_chunks_ms"] == pytest.approx(90.0)
  assert got["median_ttft_ms"] == pytest.approx(65.0)
  assert "median_ttft_one_chunk_ms" not in contention.targets("disagg", 128, records, 1.0)
  assert "median_ttft_more_chunks_ms" not in contention.targets("colocated", 128, records[:2],
                                                                1.0)


def test_fit_served_recovers_the_served_decode_cadence_and_contention_disaggregated():
  # Runs whose decode steps are 1.2x the table's and slow 1.6x beside a prefill, and whose
  # prefills slow 1.5x plus 0.1x per decoding sequence (the table says 1.0 for all). The decode
  # factor and the decode contention both move TPOT: one pass of each stalls (here at 1.5x and
  # 1.125x, 1.5% squared error); the rounds and the pair fitted together find the truth.
  from disagg_jax.sim import contention
  truth = {"prefill": 1.5, "prefill_per_seq": 0.1, "decode": 1.6}
  served = _served_by(contention.scale_decode(disagg_profile(decode_batch=16, contention=truth),
                                              1.2), seed=7)
  fitted = contention.fit_served(disagg_profile(decode_batch=16), served)
  assert 2 <= fitted.meta["served_fit_rounds"] < contention.MAX_FIT_ROUNDS  # settled
  assert fitted.meta["served_decode_factor"] == pytest.approx(1.2, abs=0.02)
  for key, value in truth.items():
    assert fitted.contention[key] == pytest.approx(value, abs=0.05)
  assert fitted.decode_s == pytest.approx(0.01 * fitted.meta["served_decode_factor"], rel=1e-3)
  for row in fitted.meta["served_fit"]:
    for key in contention.KEYS:
      assert row[f"fitted_{key}"] == pytest.approx(row[f"measured_{key}"], rel=0.01)


def test_colocated_prefix_caching_reuses_what_an_earlier_request_computed():
  # Two 200-token prompts sharing their first 150 tokens, the second after the first finished:
  # it finds 9 whole pages (144 tokens) cached and computes 56 tokens in one chunk (50 ms, not
  # two chunks). Without the tokens, or with caching off, both compute everything.
  shared = list(range(3, 153))
  prompts = [shared + list(range(500, 550)), shared + list(range(600, 650))]
  on = colocated_profile(prefix_caching=True)
  cached = simulator.simulate(on, [200, 200], [3, 3], [0.0, 1.0], prompts=prompts)
  assert [r.cached_tokens for r in cached.records] == [0, 144]
  assert cached.records[1].ttft == pytest.approx(0.05)
  m = metrics.compute(cached.records, cached.duration)
  assert m["prefix_cache_hit_rate"] == pytest.approx(144 / 400)
  for plain in (simulator.simulate(colocated_profile(), [200, 200], [3, 3], [0.0, 1.0],
                                   prompts=prompts),
                simulator.simulate(on, [200, 200], [3, 3], [0.0, 1.0])):
    assert [r.cached_tokens for r in plain.records] == [0, 0]
    assert plain.records[1].ttft == pytest.approx(0.10)
