"""The step-time table per step shape: what `sim.timing.measure` records and how the simulator
prices a step by the shape the engine would compile for it (rows computed, page-table width)."""

import numpy as np
import pytest

from disagg_jax.engine import buckets
from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.models import loading
from disagg_jax.sched.pool import SlotPool
from disagg_jax.sim import simulator, timing
from disagg_jax.sim.profile import StepProfile
from disagg_jax.testing import helpers


def _table_profile(**changes) -> StepProfile:
  """Colocated, 8 slots, 16-token pages, sequences up to 128 tokens: widths of 4 and 8 pages,
  decode steps of 2 or 8 rows. Wider and fuller steps cost more."""
  base = dict(mode="colocated", page_size=16, decode_batch=8, num_pages=64, max_seq_len=128,
              decode_s=0.001, chunk_size=32, chunk_batch=1,
              mixed_s={(1, 32): 0.010},
              decode_shapes_s={(2, 4): 0.002, (2, 8): 0.004, (8, 4): 0.003, (8, 8): 0.006},
              decode_ref=(2, 4),
              mixed_widths_s={(1, 32, 4): 0.005, (1, 32, 8): 0.010})
  base.update(changes)
  return StepProfile(**base)


def test_pool_shapes_match_the_engines_buckets():
  pool = SlotPool(8, 64, 16)
  widths, rows = buckets.width_buckets(128, 16), buckets.decode_rows(8)
  assert widths == (4, 8) and rows == (2, 8)
  pool.assign("a", 20, 0)  # 2 pages
  assert pool.table_width(widths) == 4 and pool.decode_rows([0], rows) == 2
  pool.assign("b", 70, 0)  # slot 1, 5 pages
  assert pool.table_width(widths) == 8 and pool.decode_rows([0, 1], rows) == 2
  for name in "cd":
    pool.assign(name, 1, 0)
  assert pool.decode_rows([0, 3], rows) == 8
  with pytest.raises(ValueError, match="5 exceeds the largest bucket 2"):
    pool.table_width((2,))


def test_profile_prices_a_decode_step_by_its_shape():
  profile = _table_profile()
  pool = SlotPool(8, 64, 16)
  pool.assign("a", 20, 0)
  shape = profile.decode_shape(pool, [0])
  assert shape == (2, 4)
  assert profile.decode_time(1, 20, shape) == pytest.approx(0.001)
  pool.assign("b", 100, 0)
  assert profile.decode_shape(pool, [0, 1]) == (2, 8)
  assert profile.decode_time(2, 120, (2, 8)) == pytest.approx(0.001 + 0.002)
  assert profile.decode_time(2, 120, (8, 8)) == pytest.approx(0.001 + 0.004)
  assert profile.mixed(1, 20, pool) == pytest.approx(0.010)
  pool.release(1)
  assert profile.mixed(1, 20, pool) == pytest.approx(0.005)
  # Without the tables (analytic profiles, old files) nothing changes.
  bare = _table_profile(decode_shapes_s={}, decode_ref=(), mixed_widths_s={})
  assert bare.decode_shape(pool, [0]) is None
  assert bare.decode_time(1, 20, None) == pytest.approx(0.001)
  assert bare.mixed(1, 20, pool) == pytest.approx(0.010)
  # The tables survive JSON.
  again = StepProfile.from_json(profile.to_json())
  assert again.decode_shapes_s == profile.decode_shapes_s
  assert again.mixed_widths_s == profile.mixed_widths_s
  assert again.decode_ref == (2, 4)


def test_a_data_parallel_table_prices_steps_by_their_rows_over_every_shard():
  # dp=2, chunk_batch=4: the engine's mixed steps carry 1 or 2 chunk rows per shard, 2 or 4 in
  # all, and its decode steps 2 or 8 rows in all (1 or 4 per shard of 4 slots).
  profile = _table_profile(dp=2, chunk_batch=4, decode_shapes_s={(2, 8): 0.002, (8, 8): 0.004},
                           decode_ref=(2, 8), mixed_s={(2, 32): 0.010, (4, 32): 0.016},
                           mixed_widths_s={(2, 32, 8): 0.010, (4, 32, 8): 0.016})
  pool = simulator._pool(profile)  # pylint: disable=protected-access
  assert pool.num_shards == 2 and pool.slots_per_shard == 4
  assert pool.num_shards * pool.pages_per_shard == profile.num_pages
  a, b = pool.assign("a", 20, 0), pool.assign("b", 20, 1)
  assert pool.shard_of(a) != pool.shard_of(b)
  assert profile.mixed(1, 20, pool) == pytest.approx(0.010)  # one chunk per shard: 2 rows
  assert profile.mixed(2, 20, pool) == pytest.approx(0.016)  # two in one shard: 4 rows
  assert profile.decode_shape(pool, [a, b]) == (2, 8)
  c = pool.assign("c", 20, pool.shard_of(a))
  d = pool.assign("d", 20, pool.shard_of(a))
  assert profile.decode_shape(pool, [a, b, c, d]) == (8, 8)  # index 2 within its shard
  # A smaller chunk batch keeps the steps of one row per shard.
  assert set(profile.restricted(chunk_batch=1).mixed_s) == {(2, 32)}
  # The simulator runs such a table over a pool of two shards (requests spread over both).
  result = simulator.simulate_colocated(profile, [30] * 6, [8] * 6, [0.0] * 6)
  assert len(result.records) == 6 and all(r.output_len == 8 for r in result.records)


def test_simulated_token_gap_follows_the_page_table_width():
  """One request alone: its decode steps cost the reference step while it fits 4 pages, the
  8-page step once it is longer (the engine's table widens with the longest sequence)."""
  profile = _table_profile()

  def gaps(prompt_len, output_len):
    result = simulator.simulate_colocated(profile, [prompt_len], [output_len], [0.0])
    return np.asarray(result.records[0].itl)

  short = gaps(8, 40)  # up to 48 tokens: 3 pages
  assert np.allclose(short, 0.001)
  long = gaps(80, 20)  # 80..100 tokens: 6-7 pages
  assert np.allclose(long, 0.001 + 0.002)


@pytest.fixture(scope="module")
def colocated_engine(hf_checkpoint):
  model_dir, _ = hf_checkpoint("llama3")
  config = EngineConfig(max_seq_len=128, decode_batch=8, chunk_size=32, chunk_batch=2,
                        num_pages=64)
  prefill = loading.load_model(model_dir, helpers.mesh(1, 1, start=0))
  with Engine.create("colocated", prefill, config=config, progress=False) as engine:
    yield engine


def test_measure_times_every_step_shape(colocated_engine):
  engine = colocated_engine
  profile = timing.measure(engine, iters=1)
  assert set(profile.decode_shapes_s) == set(engine.decode_step_shapes())
  assert set(profile.decode_shapes_s) == {(2, 4), (2, 8), (8, 4), (8, 8)}
  assert profile.decode_ref == (2, 4)
  assert set(profile.mixed_widths_s) == set(engine.mixed_step_shapes())
  assert {(b, c) for b, c, w in profile.mixed_widths_s if w == 8} == set(profile.mixed_s)
  assert all(t > 0 for t in [*profile.decode_shapes_s.values(),
                             *profile.mixed_widths_s.values()])
  assert profile.decode_s > 0 and profile.decode_per_seq_s >= 0
  # The measured table drives the simulator.
  result = simulator.simulate_colocated(profile, [8, 90], [20, 20], [0.0, 0.01])
  assert len(result.records) == 2 and all(r.output_len == 20 for r in result.records)


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_measure_a_data_parallel_engine(hf_checkpoint, mode):
  # Meshes of two dp rows (disaggregated: both): the table records them, its keys are the
  # engine's step shapes (rows over every dp row, prefill batches multiples of dp), and the
  # probes and the simulator price steps at those shapes.
  model_dir, _ = hf_checkpoint("llama3")
  config = EngineConfig(max_seq_len=128, decode_batch=8, chunk_size=32, chunk_batch=2,
                        prefill_batch=2, num_pages=64, prefill_cache_tokens=0)
  first = loading.load_model(model_dir, helpers.mesh(2, 1, start=0))
  second = loading.load_model(model_dir, helpers.mesh(2, 1, start=2)) if mode == "disagg" else None
  with Engine.create(mode, first, second, config=config, progress=False) as engine:
    profile = timing.measure(engine, iters=1)
    assert profile.dp == 2
    assert set(profile.decode_shapes_s) == set(engine.decode_step_shapes())
    if mode == "colocated":
      assert set(profile.mixed_widths_s) == set(engine.mixed_step_shapes())
      assert {b for b, _ in profile.mixed_s} == {2}  # one chunk row per shard
    else:
      assert profile.prefill_dp == 2
      assert set(profile.prefill_s) == set(engine.prefill_step_shapes())
      assert {b for b, _ in profile.prefill_s} == {2}  # one prompt per dp row
  result = simulator.simulate(profile, [8, 90, 40], [20, 20, 20], [0.0, 0.01, 0.02])
  assert len(result.records) == 3 and all(r.output_len == 20 for r in result.records)


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_a_request_finding_the_engine_idle_waits_for_it_to_wake(mode):
  profile = _table_profile(jitter=[])
  if mode == "disagg":
    profile = StepProfile(mode="disagg", page_size=16, decode_batch=8, num_pages=64,
                          max_seq_len=128, decode_s=0.001, prefill_batch=1,
                          length_buckets=(16, 32, 64, 128),
                          prefill_s={(1, s): 0.002 for s in (16, 32, 64, 128)},
                          insert_s={s: 0.0001 for s in (16, 32, 64, 128)},
                          transfer_s={s: 0.0001 for s in (16, 32, 64, 128)})
  arrivals = [0.0, 1.0, 1.05]  # the second finds it idle for ~1 s; the third is served at once
  plain = simulator.simulate(profile, [8, 8, 8], [4, 4, 40], arrivals)
  profile.wake_s = [[0.1, 0.004], [0.5, 0.010]]
  assert profile.wake(0.05) == pytest.approx(0.002) and profile.wake(2.0) == pytest.approx(0.010)
  woken = simulator.simulate(profile, [8, 8, 8], [4, 4, 40], arrivals)
  ttft = lambda result: [r.ttft for r in result.records]
  assert ttft(woken)[0] == pytest.approx(ttft(plain)[0])  # nothing ran before: no idle time
  assert ttft(woken)[1] == pytest.approx(ttft(plain)[1] + 0.010)
  assert ttft(woken)[2] <= ttft(plain)[2] + 0.010
