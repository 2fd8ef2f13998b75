"""Log-probabilities of generated tokens: computed on device from the logits each token was
sampled from, in every mode, equal to transformers' log-softmax of the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.engine.sampling import (MAX_LOGPROBS, InvalidRequestError, SamplingArrays,
                                        SamplingParams, sample_with_logprobs)
from disagg_jax.models import loading
from disagg_jax.testing import helpers, tiny_hf

TOP = 5


def hf_logprobs(hf_model, prompt, output):
  """log-softmax of transformers' logits at each position that predicted an output token
  [len(output), V], by one teacher-forced forward pass."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    logits = hf_model(torch.tensor([list(prompt) + list(output)])).logits[0].double()
  return torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) + len(output) - 1].numpy()


def assert_match_transformers(hf_model, prompt, out, top):
  """Each output token's logprob and its `top` alternatives against transformers (1e-4)."""
  assert out.logprobs is not None and len(out.logprobs) == len(out.output_token_ids)
  expected = hf_logprobs(hf_model, prompt, out.output_token_ids)
  for i, (token, lp) in enumerate(zip(out.output_token_ids, out.logprobs)):
    np.testing.assert_allclose(lp.logprob, expected[i, token], atol=1e-4,
                               err_msg=f"token {i} of a {len(prompt)}-token prompt")
    assert len(lp.top) == top
    ids = [t for t, _ in lp.top]
    np.testing.assert_allclose([v for _, v in lp.top], expected[i, ids], atol=1e-4)
    # the most likely tokens, in order (ties within 1e-4 may swap)
    np.testing.assert_allclose([v for _, v in lp.top], np.sort(expected[i])[::-1][:top],
                               atol=1e-4)


def test_logprobs_of_a_batch_are_the_log_softmax_and_its_top_entries():
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 300)) * 3
  params = [SamplingParams(logprobs=3), None, SamplingParams(temperature=1.0, seed=4, logprobs=0),
            SamplingParams(temperature=0.7, top_k=5, logprobs=MAX_LOGPROBS), None,
            SamplingParams(temperature=1.0, top_p=0.5)]
  arrays = SamplingArrays.from_params(params, 6)
  tokens, lp = sample_with_logprobs(logits, arrays, jnp.arange(6, dtype=jnp.int32))
  expected = np.asarray(jax.nn.log_softmax(logits, -1))
  tokens = np.asarray(tokens)
  for row in (0, 2, 3):
    np.testing.assert_allclose(lp.logprob[row], expected[row, tokens[row]], rtol=1e-6)
    order = np.argsort(-expected[row], kind="stable")[:MAX_LOGPROBS]
    assert list(np.asarray(lp.top_ids[row])) == list(order)
    np.testing.assert_allclose(lp.top_logprobs[row], expected[row, order], rtol=1e-6)
  # No row asking: the batch-level cond returns zeros.
  none = SamplingArrays.from_params([SamplingParams()] * 6, 6)
  _, zero = sample_with_logprobs(logits, none, jnp.zeros(6, jnp.int32))
  assert not np.asarray(zero.top_logprobs).any() and not np.asarray(zero.logprob).any()


@pytest.mark.parametrize("value", [-1, MAX_LOGPROBS + 1, True, 2.0])
def test_invalid_logprobs_are_refused(value):
  with pytest.raises(InvalidRequestError, match=r"logprobs must be an integer in \[0, 20\]"):
    SamplingParams(logprobs=value)


def engine(model_dir, mode, config):
  if mode == "colocated":
    return Engine.create("colocated", loading.load_model(model_dir, helpers.mesh(2, 2)),
                         config=config, progress=False)
  return Engine.create("disagg", loading.load_model(model_dir, helpers.mesh(1, 1, start=0)),
                       loading.load_model(model_dir, helpers.mesh(2, 2, start=4)),
                       config=config, progress=False)


CONFIG = EngineConfig(max_seq_len=64, decode_batch=4, prefill_batch=2, chunk_size=32,
                      chunk_batch=2, prefix_caching=False, prefill_cache_tokens=0,
                      precompile_len=0)


@pytest.mark.parametrize("mode, changes", [
    ("single", {}),
    ("colocated", {}),
    # the prefill-side cache: first tokens (and their logprobs, penalties) from the mixed step
    ("disagg", {"prefix_caching": True, "prefill_cache_tokens": 512}),
    # dense prefill in layer groups: the first token from the last group, its penalty history
    # built in-step from the prompt
    ("disagg", {"transfer": "layers:1"}),
])
def test_logprobs_and_penalties_match_transformers(mode, changes, hf_checkpoint):
  """One engine per mode serves greedy and sampled rows with and without logprobs, and
  penalized rows (tests/engine/test_penalties.py has their rule), in one batch."""
  from tests.engine.test_penalties import hf_penalized_greedy  # pylint: disable=g-import-not-at-top
  model_dir, hf_model = hf_checkpoint("qwen3")
  prompts = helpers.random_prompts((1, 17, 40, 5, 33, 3, 30, 12), tiny_hf.VOCAB, seed=3)
  sampling = [SamplingParams(max_new_tokens=10, logprobs=TOP),
              SamplingParams(max_new_tokens=10, temperature=1.0, seed=7, logprobs=TOP),
              SamplingParams(max_new_tokens=10),
              SamplingParams(max_new_tokens=10, temperature=0.8, top_k=10, seed=1, logprobs=0),
              SamplingParams(max_new_tokens=10, logprobs=MAX_LOGPROBS),
              # penalized (greedy): the logprobs stay the model's, before the penalties
              SamplingParams(max_new_tokens=10, repetition_penalty=1.8, logprobs=2),
              SamplingParams(max_new_tokens=10, frequency_penalty=1.5),
              SamplingParams(max_new_tokens=10, presence_penalty=2.0, repetition_penalty=0.9)]
  if mode == "single":
    model = loading.load_model(model_dir, helpers.mesh(2, 2))
    outputs = helpers.static_generator(model).generate(prompts, sampling)
  else:
    config = EngineConfig(**{**CONFIG.__dict__, **changes})
    with engine(model_dir, mode, config) as e:
      streams = [e.add_request(p, s) for p, s in zip(prompts, sampling)]
      outputs = [s.result() for s in streams]
      # A streaming client sees entry i of `stream.logprobs` with token i.
      for stream, out in zip(streams, outputs):
        assert stream.logprobs == (out.logprobs or [None] * len(out.output_token_ids))
  changed = 0
  for prompt, params, out in zip(prompts, sampling, outputs):
    assert out.finish_reason in ("stop", "length"), out.error
    if params.penalized:
      assert out.output_token_ids == hf_penalized_greedy(hf_model, prompt, params), params
      plain = helpers.hf_greedy(hf_model, prompt, 10, eos_ids=(tiny_hf.EOS,))
      changed += out.output_token_ids != plain
    if params.logprobs is None:
      assert out.logprobs is None and "logprobs" not in out.to_json()
      continue
    assert_match_transformers(hf_model, prompt, out, params.logprobs)
    assert len(out.to_json()["logprobs"]) == len(out.output_token_ids)
  assert changed >= 2  # the penalties did change what greedy decoding picks
