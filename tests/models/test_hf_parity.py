"""The model against transformers on tiny random checkpoints of every supported family."""

import numpy as np
import pytest

from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.models import loading
from disagg_jax.testing import helpers, tiny_hf

PROMPT_LENGTHS = (1, 2, 15, 16, 17, 63, 100, 250)


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_logits_and_greedy_match_transformers(family, hf_checkpoint):
  model_dir, hf_model = hf_checkpoint(family)
  model = loading.load_model(model_dir, helpers.mesh())
  generator = helpers.static_generator(model, max_batch=len(PROMPT_LENGTHS))
  prompts = helpers.random_prompts(PROMPT_LENGTHS, tiny_hf.VOCAB, seed=1)

  ours = helpers.last_logits(generator, prompts)
  for prompt, logits in zip(prompts, ours):
    np.testing.assert_allclose(logits, helpers.hf_last_logits(hf_model, prompt), atol=1e-4,
                               err_msg=f"{family}, prompt of {len(prompt)} tokens")

  outputs = generator.generate(prompts, SamplingParams(max_new_tokens=24))
  for prompt, out in zip(prompts, outputs):
    expected = helpers.hf_greedy(hf_model, prompt, 24, eos_ids=(tiny_hf.EOS,))
    assert out.output_token_ids == expected, f"{family}, prompt of {len(prompt)} tokens"
    assert out.finish_reason == ("stop" if expected[-1] == tiny_hf.EOS else "length")


def test_bfloat16_checkpoint_loads_close_to_float32(hf_checkpoint):
  model_dir, hf_model = hf_checkpoint("qwen2", dtype="bfloat16")
  prompts = helpers.random_prompts((5, 40), tiny_hf.VOCAB, seed=2)
  logits = {}
  for dtype in ("float32", "bfloat16"):
    model = loading.load_model(model_dir, helpers.mesh(), dtype)
    logits[dtype] = helpers.last_logits(helpers.static_generator(model), prompts)
  scale = np.abs(logits["float32"]).max()
  assert np.abs(logits["bfloat16"] - logits["float32"]).max() < 0.05 * scale
  # The float32 load of the bfloat16 file is the bfloat16 weights exactly, so it matches HF's
  # model after the same rounding.
  np.testing.assert_allclose(logits["float32"][0],
                             helpers.hf_last_logits(hf_model, prompts[0]), atol=2e-2 * scale)
