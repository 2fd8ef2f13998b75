"""The serving engine in both modes: same tokens as the reference path, pages always returned."""

import threading

import numpy as np
import pytest

from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams
from disagg_jax.models import loading
from disagg_jax.testing import helpers, tiny_hf

CONFIG = EngineConfig(max_seq_len=128, decode_batch=4, prefill_batch=2, chunk_size=32,
                      chunk_batch=2)


def reference_outputs(model_dir, prompts, sampling):
  model = loading.load_model(model_dir, helpers.mesh())
  outputs = helpers.static_generator(model, max_batch=16).generate(prompts, sampling)
  return [o.output_token_ids for o in outputs]


def make_engine(model_dir, mode, prefill_tp=1, decode_tp=1, config=CONFIG, prefill_dp=1,
                decode_dp=1):
  """Meshes of dp x tp devices: the prefill (or colocated) one from device 0, decode from 4."""
  prefill_mesh = helpers.mesh(prefill_dp * prefill_tp, prefill_tp, start=0)
  if mode == "colocated":
    return Engine.create("colocated", loading.load_model(model_dir, prefill_mesh),
                         config=config, progress=False)
  prefill = loading.load_model(model_dir, prefill_mesh)
  decode = loading.load_model(model_dir, helpers.mesh(decode_dp * decode_tp, decode_tp, start=4))
  return Engine.create("disagg", prefill, decode, config=config, progress=False)


def assert_all_pages_free(engine):
  stats = engine.stats()
  assert stats["free_pages"] == stats["total_pages"] and stats["running"] == 0
  assert stats["in_flight"] == 0


@pytest.mark.parametrize("family, mode, prefill_tp, decode_tp", [
    pytest.param("llama3", "colocated", 1, 1, marks=pytest.mark.slow),
    ("qwen3", "colocated", 2, 2),
    # Disaggregated 1->1: test_many_requests_with_waiting_and_preemption and
    # tests/engine/test_prefix_caching.py; 2->1 and 2->2: tests/engine/test_transfer.py; prefill
    # TP < decode TP: test_data_parallel_meshes_match_single below
    pytest.param("qwen2", "disagg", 2, 2, marks=pytest.mark.slow),
    pytest.param("qwen3", "disagg", 4, 2, marks=pytest.mark.slow),
    pytest.param("mistral", "disagg", 2, 4, marks=pytest.mark.slow),
    ("llama3_legacy_rope", "disagg", 4, 1),
])
def test_greedy_matches_single(family, mode, prefill_tp, decode_tp, hf_checkpoint):
  model_dir, _ = hf_checkpoint(family)
  prompts = helpers.random_prompts((1, 16, 17, 40, 70, 3, 33), tiny_hf.VOCAB, seed=21)
  sampling = SamplingParams(max_new_tokens=12)
  expected = reference_outputs(model_dir, prompts, sampling)
  with make_engine(model_dir, mode, prefill_tp, decode_tp) as engine:
    outputs = engine.generate(prompts, sampling)
    assert [o.output_token_ids for o in outputs] == expected
    assert engine.recompiled() == {}
    assert_all_pages_free(engine)


@pytest.mark.parametrize("family, mode, prefill, decode", [
    pytest.param("llama3", "colocated", (2, 1), None, marks=pytest.mark.slow),  # (dp, tp)
    pytest.param("qwen3", "colocated", (2, 2), None, marks=pytest.mark.slow),
    ("llama3", "colocated", (1, 4), None),  # 2 KV heads on tp 4: each stored twice
    pytest.param("qwen2", "disagg", (2, 1), (2, 2), marks=pytest.mark.slow),
    ("llama3", "disagg", (4, 1), (1, 4)),
    pytest.param("mistral", "disagg", (1, 2), (4, 1), marks=pytest.mark.slow),  # 1 KV head
])
def test_data_parallel_meshes_match_single(family, mode, prefill, decode, hf_checkpoint):
  """dp splits the batch and the page pool; the tokens stay the reference's, sampled ones too."""
  model_dir, _ = hf_checkpoint(family)
  prompts = helpers.random_prompts((1, 16, 17, 40, 70, 3, 33, 9, 25), tiny_hf.VOCAB, seed=22)
  sampling = [SamplingParams(max_new_tokens=12, temperature=0.8 if i % 2 else 0.0, seed=i)
              for i in range(len(prompts))]
  expected = reference_outputs(model_dir, prompts, sampling)
  (pdp, ptp), (ddp, dtp) = prefill, decode or (1, 1)
  with make_engine(model_dir, mode, ptp, dtp, prefill_dp=pdp, decode_dp=ddp) as engine:
    outputs = engine.generate(prompts, sampling)
    assert [o.output_token_ids for o in outputs] == expected
    assert engine.recompiled() == {}
    assert_all_pages_free(engine)
    slots = engine.core.slots
    assert slots.num_shards == (pdp if mode == "colocated" else ddp)
    assert len(slots.allocators) == slots.num_shards


@pytest.mark.parametrize("mode, dp", [("colocated", 1), ("disagg", 1),
                                      pytest.param("colocated", 2, marks=pytest.mark.slow)])
def test_many_requests_with_waiting_and_preemption(mode, dp, hf_checkpoint):
  """64 concurrent requests through a pool far too small for them: requests wait, the youngest
  are preempted and recomputed, and every output still equals the request run alone. With dp 2
  each dp row has its own 13 pages and its own 2 slots."""
  model_dir, _ = hf_checkpoint("llama3")
  rng = np.random.default_rng(3)
  lengths = rng.integers(1, 60, 64)
  prompts = helpers.random_prompts(lengths, tiny_hf.VOCAB, seed=4)
  # Penalties on some: their history (prompt + tokens so far) is rebuilt after a preemption.
  penalties = [{}, {"presence_penalty": 1.0}, {"frequency_penalty": 0.7},
               {"repetition_penalty": 1.4}]
  sampling = [SamplingParams(max_new_tokens=int(n), ignore_eos=True, temperature=0.7, seed=i,
                             **penalties[i % 4])
              for i, n in enumerate(rng.integers(1, 40, 64))]
  expected = reference_outputs(model_dir, prompts, sampling)
  # 13 usable pages of 16 tokens for 4 slots of up to 99 tokens each: growth must preempt.
  config = EngineConfig(max_seq_len=128, decode_batch=4 * dp, prefill_batch=2, chunk_size=32,
                        chunk_batch=2 * dp, num_pages=14 * dp)
  with make_engine(model_dir, mode, config=config, prefill_dp=dp) as engine:
    outputs = engine.generate(prompts, sampling)
    assert [o.output_token_ids for o in outputs] == expected
    assert sum(o.metrics.preemptions for o in outputs) > 0
    assert engine.recompiled() == {}
    assert_all_pages_free(engine)


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_streaming_abort_and_bad_requests(mode, hf_checkpoint):
  model_dir, _ = hf_checkpoint("qwen2")
  with make_engine(model_dir, mode) as engine:
    long = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=100, ignore_eos=True))
    other = engine.add_request([9, 10], SamplingParams(max_new_tokens=5, ignore_eos=True))
    received = []
    for token in long:
      received.append(token)
      if len(received) == 3:
        assert engine.abort(long.request_id)
    result = long.result(timeout=60)
    assert result.finish_reason == "abort"
    assert result.output_token_ids == received and 3 <= len(received) < 100
    assert len(other.result(timeout=60).output_token_ids) == 5
    assert not engine.abort(long.request_id)  # no longer in flight

    with pytest.raises(InvalidRequestError, match="prompt is empty"):
      engine.add_request([], SamplingParams())
    with pytest.raises(InvalidRequestError, match="exceeds max_seq_len 128"):
      engine.add_request([3] * 100, SamplingParams(max_new_tokens=29))
    outputs = engine.generate([[3, 4], [3, tiny_hf.VOCAB], [8, 9, 10]],
                              SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert outputs[1].finish_reason == "error" and "outside the vocabulary" in outputs[1].error
    assert len(outputs[0].output_token_ids) == 4 and len(outputs[2].output_token_ids) == 4
    assert_all_pages_free(engine)


def test_concurrent_clients_stream_in_order(hf_checkpoint):
  model_dir, _ = hf_checkpoint("llama3")
  prompts = helpers.random_prompts((4, 9, 30, 2, 50, 12), tiny_hf.VOCAB, seed=8)
  sampling = SamplingParams(max_new_tokens=10)
  expected = reference_outputs(model_dir, prompts, sampling)
  results = [None] * len(prompts)
  with make_engine(model_dir, "disagg", 2, 2) as engine:
    def client(i):
      stream = engine.add_request(prompts[i], sampling)
      results[i] = (list(stream), stream.result(timeout=60).output_token_ids)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=120)
  for (streamed, final), want in zip(results, expected):
    assert streamed == final == want
