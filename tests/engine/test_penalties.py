"""Presence, frequency and repetition penalties (vLLM's rule), kept per slot on device: the rule
here; the engine's penalized greedy tokens against transformers' logits penalized step by step,
in every mode: tests/engine/test_logprobs.py (one engine per mode serves both); after a
preemption: tests/engine/test_engine.py (test_many_requests_...)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disagg_jax.engine.sampling import (PROMPT_FLAG, InvalidRequestError, SamplingArrays,
                                        SamplingParams, apply_penalties, history_row)
from disagg_jax.testing import tiny_hf


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
