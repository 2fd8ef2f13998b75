"""Prefix caching in the serving engine: the same greedy tokens with it on and off."""

import pytest

from disagg_jax.engine.engine import EngineConfig
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.testing import helpers, tiny_hf

from tests.engine.test_engine import assert_all_pages_free, make_engine, reference_outputs

# Disaggregated, the decode side's cache alone (on CPU its prefill is off by default; the
# prefill side's cache: test_prefill_side_cache_keeps_greedy_tokens).
CONFIG = EngineConfig(max_seq_len=160, decode_batch=4, prefill_batch=2, chunk_size=32,
                      chunk_batch=2, decode_prefill_tokens=32, prefill_cache_tokens=0)


def _prompts():
  """Prompts sharing a 50-token prefix, a repeated prompt, a prompt that is a prefix of another,
  and a page-aligned one (all its pages cached on the second pass: its last page is recomputed)."""
  prefix, a, b, c = helpers.random_prompts((50, 30, 7, 64), tiny_hf.VOCAB, seed=31)
  return [prefix + a, prefix + b, prefix + a, prefix, prefix + a + b, c, c[:48], c]


# Disaggregated: the decode pool caches what it received; on the second pass every prompt's
# uncached tail is at most 32 tokens, so it is prefilled on the decode mesh.
@pytest.mark.parametrize("mode, tp, dp", [
    pytest.param("colocated", 1, 1, marks=pytest.mark.slow), ("colocated", 1, 2),
    ("disagg", 1, 1)])
def test_greedy_tokens_are_the_same_with_prefix_caching(mode, tp, dp, hf_checkpoint):
  model_dir, _ = hf_checkpoint("llama3")
  prompts = _prompts()
  sampling = SamplingParams(max_new_tokens=10)
  expected = reference_outputs(model_dir, prompts, sampling)
  # Disaggregated without caching is every other disagg test: only the cached engine here.
  for caching in (False, True) if mode == "colocated" else (True,):
    config = EngineConfig(**{**CONFIG.__dict__, "prefix_caching": caching})
    with make_engine(model_dir, mode, prefill_tp=tp, decode_tp=tp, prefill_dp=dp,
                     decode_dp=dp, config=config) as engine:
      cached = []
      for _ in range(2 if caching else 1):  # the second pass finds the first one's pages
        outputs = engine.generate(prompts, sampling)
        assert [o.output_token_ids for o in outputs] == expected
        cached.append([o.metrics.cached_tokens for o in outputs])
      # One request at a time: each finds what the ones before it computed.
      for prompt, want in zip(prompts[:4] if caching else [], expected):
        assert engine.generate([prompt], sampling)[0].output_token_ids == want
      assert_all_pages_free(engine)
    if caching:
      # Whole pages only, never the last prompt token (its logits give the first token).
      assert cached[1] == [(len(p) - 1) // 16 * 16 for p in prompts]
      assert cached[0][:2] == [0, 0]
    else:
      assert not any(cached[0])


# The prefill mesh's own cache (decode side off): prefill computes only the uncached tails in
# chunks and reads each request's pages out of its pool for the transfer. dp=2 reads the right
# dp row's block; mistral on tp=2 (one KV head) stores each head twice in the pool.
@pytest.mark.parametrize("family, prefill_tp, prefill_dp, layers", [
    ("llama3", 1, 2, "request"),
    pytest.param("mistral", 2, 1, "layers:1", marks=pytest.mark.slow)])
def test_prefill_side_cache_keeps_greedy_tokens(family, prefill_tp, prefill_dp, layers,
                                                hf_checkpoint):
  model_dir, _ = hf_checkpoint(family)
  prompts = _prompts()
  sampling = SamplingParams(max_new_tokens=10)
  expected = reference_outputs(model_dir, prompts, sampling)
  config = EngineConfig(**{**CONFIG.__dict__, "decode_prefill_tokens": 0,
                           "prefill_cache_tokens": 1024, "transfer": layers})
  with make_engine(model_dir, "disagg", prefill_tp=prefill_tp, prefill_dp=prefill_dp,
                   config=config) as engine:
    cached = []
    for _ in range(2):
      outputs = engine.generate(prompts, sampling)
      assert [o.output_token_ids for o in outputs] == expected
      cached.append([o.metrics.cached_tokens for o in outputs])
    assert engine.stats()["prefill_cached_pages"] > 0
    assert engine.stats()["cached_pages"] == 0  # the decode pool does not cache
    assert_all_pages_free(engine)
    engine.prefill.slots.check()
    assert not engine.prefill.slots.occupied()
  assert cached[1] == [(len(p) - 1) // 16 * 16 for p in prompts]


def test_prefill_cache_flag_errors(hf_checkpoint):
  model_dir, _ = hf_checkpoint("llama3")
  for value, words in ((-2, r"must be -1 \(auto\), 0 \(off\)"), (32, "needs 10")):
    config = EngineConfig(**{**CONFIG.__dict__, "prefill_cache_tokens": value})
    with pytest.raises(ValueError, match=r"--config.engine.prefill_cache_tokens=.*" + words):
      make_engine(model_dir, "disagg", config=config)
