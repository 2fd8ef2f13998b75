"""Presence, frequency and repetition penalties (vLLM's rule), kept per slot on device: the
engine's penalized greedy tokens equal transformers' logits penalized step by step, in every
mode; after a preemption: tests/engine/test_engine.py (test_many_requests_...)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disagg_jax.engine.engine import EngineConfig
from disagg_jax.engine.sampling import (PROMPT_FLAG, InvalidRequestError, SamplingArrays,
                                        SamplingParams, apply_penalties, history_row)
from disagg_jax.models import loading
from disagg_jax.testing import helpers, tiny_hf

from tests.engine.test_logprobs import CONFIG, engine  # the same small engines


def penalize(logits, prompt, output, params: SamplingParams):
  """vLLM's rule on one row, in NumPy (float64)."""
  counts = np.bincount(np.asarray(output, np.int64), minlength=logits.shape[-1])
  seen = counts > 0
  seen[list(prompt)] = True
  r = params.repetition_penalty
  out = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
  return out - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)


def hf_penalized_greedy(hf_model, prompt, params: SamplingParams):
  import torch  # pylint: disable=g-import-not-at-top
  output = []
  for _ in range(params.max_new_tokens):
    with torch.no_grad():
      logits = hf_model(torch.tensor([list(prompt) + output])).logits[0, -1].double().numpy()
    output.append(int(np.argmax(penalize(logits, prompt, output, params))))
    if output[-1] == tiny_hf.EOS:
      break
  return output


@pytest.mark.parametrize("kwargs, message", [
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\], got 2.5"),
    ({"frequency_penalty": float("nan")}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": True}, "repetition_penalty must be a finite number > 0"),
])
def test_invalid_penalties_are_refused(kwargs, message):
  with pytest.raises(InvalidRequestError, match=message):
    SamplingParams(**kwargs)


def test_penalties_follow_the_rule_row_by_row():
  vocab = 64
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, vocab)) * 3, np.float32)
  params = [SamplingParams(repetition_penalty=1.7), SamplingParams(),
            SamplingParams(frequency_penalty=0.6, presence_penalty=-0.4),
            SamplingParams(presence_penalty=1.0, repetition_penalty=0.8)]
  prompts = [[1, 2, 3], [4], [5, 5, 9], [10, 11]]
  outputs = [[3, 7, 7], [4, 4], [9, 12, 12, 12], []]
  history = np.stack([history_row(p, o, vocab) for p, o in zip(prompts, outputs)])
  assert history[2, 12] == 3 and history[2, 5] == PROMPT_FLAG and history[2, 9] == PROMPT_FLAG + 1
  got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(history),
                                   SamplingArrays.from_params(params, 4)))
  for i in range(4):
    np.testing.assert_allclose(got[i], penalize(logits[i].astype(np.float64), prompts[i],
                                                outputs[i], params[i]), rtol=1e-6, atol=1e-6)
  # No penalized row: the logits pass through untouched.
  plain = SamplingArrays.from_params([SamplingParams()] * 4, 4)
  assert (np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(history), plain))
          == logits).all()


@pytest.mark.parametrize("mode, changes", [
    ("single", {}),
    ("colocated", {}),
    # the prefill-side cache: first tokens from the mixed step
    ("disagg", {"prefix_caching": True, "prefill_cache_tokens": 512}),
    # dense prefill in layer groups: the first token's history built from the prompt in-step
    ("disagg", {"transfer": "layers:1"}),
])
def test_penalized_greedy_matches_transformers(mode, changes, hf_checkpoint):
  model_dir, hf_model = hf_checkpoint("qwen3")
  prompts = helpers.random_prompts((3, 17, 30, 9, 12), tiny_hf.VOCAB, seed=5)
  sampling = [SamplingParams(max_new_tokens=12, repetition_penalty=1.8),
              SamplingParams(max_new_tokens=12, frequency_penalty=1.5),
              SamplingParams(max_new_tokens=12),
              SamplingParams(max_new_tokens=12, presence_penalty=2.0, repetition_penalty=0.9),
              SamplingParams(max_new_tokens=12, presence_penalty=-1.0)]
  if mode == "single":
    outputs = helpers.static_generator(loading.load_model(model_dir, helpers.mesh(2, 2))
                                       ).generate(prompts, sampling)
  else:
    with engine(model_dir, mode, EngineConfig(**{**CONFIG.__dict__, **changes})) as e:
      outputs = e.generate(prompts, sampling)
  changed = 0
  for prompt, params, out in zip(prompts, sampling, outputs):
    assert out.output_token_ids == hf_penalized_greedy(hf_model, prompt, params), params
    plain = helpers.hf_greedy(hf_model, prompt, 12, eos_ids=(tiny_hf.EOS,))
    changed += out.output_token_ids != plain
  assert changed >= 3  # the penalties did change what greedy decoding picks
