"""`--elastic` in one process: the prefill:decode split moves under load and nothing is lost.

The engine runs on four devices (2P:2D to start); requests stream while the split moves to 1P:3D
(prepared ahead, handed over by hand) and back to 2P:2D with the prefill side at TP 2 (by a
control step: a move that changes a side's tensor parallelism), each move with requests queued,
prefilling and decoding. Every request finishes
with the reference path's greedy tokens, the streams see every token once, the moved requests'
lost KV is counted, and the parameters move device to device.
"""

import threading

import jax._src.array as jax_array
import pytest

from disagg_jax.engine.elastic import ElasticEngine, decode_capacity
from disagg_jax.engine.engine import EngineConfig
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.models import loading
from disagg_jax.sched.elastic import TO_PREFILL, ElasticConfig
from disagg_jax.serve.metrics import ServerMetrics
from disagg_jax.testing import helpers, tiny_hf

# Shapes compile on first use (precompile_len=0): each split's engine compiles only what it runs.
CONFIG = EngineConfig(max_seq_len=128, decode_batch=6, prefill_batch=2, chunk_size=32,
                      chunk_batch=2, precompile_len=0)
SLOS = ElasticConfig(ttft_slo_s=2.0, tpot_slo_s=0.2, window_s=60.0)


def make_elastic(model_dir, **kwargs):
  prefill = loading.load_model(model_dir, helpers.mesh(2, 1, start=0))
  decode = loading.load_model(model_dir, helpers.mesh(2, 1, start=2))
  return ElasticEngine(prefill, decode, CONFIG, SLOS, progress=False, **kwargs)


def test_moves_under_load_lose_nothing(hf_checkpoint, monkeypatch):
  model_dir, _ = hf_checkpoint("llama3")
  prompts = helpers.random_prompts([5, 40, 17, 70, 3, 33, 60, 9, 25, 50], tiny_hf.VOCAB, seed=7)
  sampling = SamplingParams(max_new_tokens=24)
  model = loading.load_model(model_dir, helpers.mesh())
  expected = [o.output_token_ids for o in
              helpers.static_generator(model, max_batch=16).generate(prompts, sampling)]

  engine = make_elastic(model_dir, control=False)
  try:
    streamed = {i: [] for i in range(len(prompts))}
    decoding = [threading.Event() for _ in prompts]

    def on_token(i):
      def put(token):
        streamed[i].append(token)
        if len(streamed[i]) >= 3:
          decoding[i].set()
      return put

    def submit(first, last):
      out = [engine.add_request(p, sampling, on_token=on_token(i))
             for i, p in enumerate(prompts[first:last], start=first)]
      assert all(decoding[i].wait(120) for i in range(first, min(first + 2, last)))
      return out

    # Parameters re-placed on the new meshes never pass through host memory.
    host_copies = []
    original = jax_array.ArrayImpl._value
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(
        lambda a: (host_copies.append(a.shape) if a.ndim >= 2 else None, original.fget(a))[1]))
    to_1p = engine.prepare(1)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", original)
    assert host_copies == []
    streams = submit(0, 6)  # some decoding, some waiting (6 slots of 24 tokens, prefill 2 a step)
    first = engine.hand_over(to_1p)
    assert engine.stats()["decode_devices"] == 3
    streams += submit(6, 10)

    # The control thread's step, under load too: the window's signals go to the controller (a
    # stub here, asking for one worker more on prefill), its move is made.
    engine.controller = OneMove(SLOS)
    second = engine.control_step()
    signals = engine.controller.log[0].signals
    streams += [engine.add_request(prompts[0], sampling, request_id="late")]
    outputs = [s.result(timeout=300) for s in streams]
    assert engine.control_step() is None  # the controller holds
    with pytest.raises(ValueError, match="is not one of"):
      engine.switch_to(4)
    with pytest.raises(ValueError, match="is not one of"):
      engine.switch_to(1, prefill_tp=2)  # one device holds no TP group of 2
  finally:
    engine.shutdown()

  assert outputs[-1].output_token_ids == expected[0]
  outputs = outputs[:-1]
  assert [o.output_token_ids for o in outputs] == expected
  assert all(o.finish_reason == "length" for o in outputs)
  assert [streamed[i] for i in range(len(prompts))] == expected  # each token streamed once
  assert engine.split_timeline[0] == [0.0, 2, 2]
  assert [t[1:] for t in engine.split_timeline[1:]] == [[1, 3], [2, 2]]
  assert engine.split_changes == 2
  # The first move caught requests decoding: their KV was lost, counted, and recomputed.
  assert first.moved_requests >= 1 and first.recomputed_tokens > 0
  assert sum(o.metrics.preemptions for o in outputs) >= 1
  report = engine.report()
  assert report["split_changes"] == 2 and len(report["elastic_switches"]) == 2
  assert [d["action"] for d in report["elastic_decisions"]] == [TO_PREFILL, None]
  # Signals of the window since the start: the ten requests arrived in it.
  assert (signals.prefill_workers, signals.decode_workers) == (1, 3)
  assert signals.arriving_prompt_tokens_per_s == pytest.approx(
      sum(map(len, prompts)) / signals.time, rel=0.05)
  assert signals.arriving_output_tokens_per_s == pytest.approx(10 * 24 / signals.time, rel=0.05)
  assert signals.ttft_attainment is not None and signals.tpot_attainment is not None
  assert signals.prefill_tokens_per_s > 0 and signals.decode_tokens_per_s_per_worker > 0
  assert (second.prefill_devices, second.decode_devices) == (2, 2)
  assert (second.prefill_tp, second.decode_tp) == (2, 1) and engine.split == (2, 2, 1)
  stats = engine.stats()
  assert (stats["prefill_devices"], stats["decode_devices"], stats["split_changes"]) == (2, 2, 2)
  text = ServerMetrics().render(stats, 0)  # the server's /metrics
  for line in ("disagg_jax_prefill_devices 2", "disagg_jax_decode_devices 2",
               "disagg_jax_split_changes 2"):
    assert line in text.splitlines()


class OneMove:
  """A controller that asks once for one device more on prefill, the prefill side at TP 2, then
  holds (the wiring, not the policy: tests/sched/test_elastic.py tests the policy)."""

  def __init__(self, config):
    self.config = config
    self.log = []

  def decide(self, signals, options, current):
    from disagg_jax.sched.elastic import Decision  # pylint: disable=g-import-not-at-top
    keys = [o.key for o in options]
    assert current in keys and keys[0][1:] == current[1:]  # the current TPs' splits first
    target = (current[0] + 1, 2, current[2]) if not self.log else None
    assert target is None or target in keys
    action = TO_PREFILL if target else None
    self.log.append(Decision(signals.time, action, "test", signals, 1 if action else 0, target))
    return action


def test_decode_capacity_fits_step_time_against_rows():
  # Steps of 2, 4 and 8 rows taking 10 + 5 x rows ms: the largest batch meeting a 50 ms TPOT is
  # 8 rows (50 ms), 160 tokens/s; with 64 slots and a 1 s TPOT, all 64 rows (330 ms).
  rows = [2, 4, 8] * 4
  secs = [0.010 + 0.005 * r for r in rows]
  work = {"decode_steps": len(rows), "decode_tokens": sum(rows), "decode_busy_s": sum(secs),
          "decode_rows_sq": sum(r * r for r in rows),
          "decode_rows_busy": sum(r * t for r, t in zip(rows, secs))}
  assert decode_capacity(work, 64, 0.050) == pytest.approx(8 / 0.050)
  assert decode_capacity(work, 64, 1.0) == pytest.approx(64 / 0.330)
  # One batch size only: the mean step's rate at a full batch.
  flat = {"decode_steps": 4, "decode_tokens": 16, "decode_busy_s": 0.08, "decode_rows_sq": 64,
          "decode_rows_busy": 0.32}
  assert decode_capacity(flat, 32, 0.05) == pytest.approx(32 / 0.02)
