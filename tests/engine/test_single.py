"""The static-batch reference path: batching is invisible, bad requests fail alone."""

import pytest

from disagg_jax.engine.request import Limits
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.models import loading
from disagg_jax.testing import helpers, tiny_hf


@pytest.fixture(scope="module")
def llama(hf_checkpoint):
  return loading.load_model(hf_checkpoint("llama3")[0], helpers.mesh())


def test_batching_is_invisible(llama):
  lengths = (1, 9, 16, 17, 40, 3, 120, 64, 33, 2)
  prompts = helpers.random_prompts(lengths, tiny_hf.VOCAB, seed=5)
  greedy = SamplingParams(max_new_tokens=16)
  sampled = [SamplingParams(max_new_tokens=16, temperature=0.9, top_k=50, seed=s)
             for s in range(len(prompts))]
  generator = helpers.static_generator(llama, max_batch=4)  # three batches, different buckets
  for sampling in (greedy, sampled):
    together = generator.generate(prompts, sampling)
    for i, prompt in enumerate(prompts):
      alone = generator.generate([prompt], sampling if sampling is greedy else [sampling[i]])[0]
      assert together[i].output_token_ids == alone.output_token_ids, f"prompt {i}"


def test_stop_ids_and_eos(llama):
  prompt = helpers.random_prompts((12,), tiny_hf.VOCAB, seed=6)[0]
  generator = helpers.static_generator(llama)
  free = generator.generate([prompt], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
  assert free.finish_reason == "length" and len(free.output_token_ids) == 20
  stop_at = free.output_token_ids[5]
  first = free.output_token_ids.index(stop_at)
  stopped = generator.generate(
      [prompt], SamplingParams(max_new_tokens=20, stop_token_ids=(stop_at,), ignore_eos=True))[0]
  assert stopped.output_token_ids == free.output_token_ids[:first + 1]
  assert stopped.finish_reason == "stop"


def test_invalid_prompts_fail_alone(llama):
  generator = helpers.static_generator(
      llama, limits=Limits(max_seq_len=128, max_prefill_length=100))
  good = helpers.random_prompts((5,), tiny_hf.VOCAB)[0]
  prompts = [good, [], [5] * 101, [3, tiny_hf.VOCAB, 4], [3, -1], [5] * 100, good]
  outs = generator.generate(prompts, SamplingParams(max_new_tokens=10))
  errors = [o.error for o in outs]
  assert errors[0] is None and errors[-1] is None
  assert outs[0].output_token_ids == outs[-1].output_token_ids
  assert len(outs[0].output_token_ids) == 10 or outs[0].finish_reason == "stop"
  assert "prompt is empty" in errors[1]
  assert "prompt has 101 tokens; max_prefill_length is 100" in errors[2]
  assert f"prompt token 1 is {tiny_hf.VOCAB}, outside the vocabulary [0, {tiny_hf.VOCAB})" in errors[3]
  assert "prompt token 1 is -1" in errors[4]
  assert errors[5] is None
  too_long = generator.generate([[5] * 100], SamplingParams(max_new_tokens=29))[0]
  assert "prompt (100 tokens) + max_new_tokens (29) = 129 exceeds max_seq_len 128" in too_long.error
  assert all(o.finish_reason == "error" for o in outs[1:5])
