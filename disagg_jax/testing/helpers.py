"""Small helpers the tests share: meshes, generators, the logits of a batch of prompts."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from disagg_jax import parallel
from disagg_jax.engine import buckets
from disagg_jax.engine.request import Limits
from disagg_jax.engine.sampling import SamplingArrays
from disagg_jax.engine.single import StaticGenerator
from disagg_jax.models.loading import Model


def mesh(num_devices: int = 1, tp: int = 1, start: int = 0):
  return parallel.make_mesh(jax.devices()[start:start + num_devices], tp)


def static_generator(model: Model, max_batch: int = 8, limits: Limits | None = None,
                     **kwargs) -> StaticGenerator:
  return StaticGenerator(model, limits=limits or Limits.for_model(model.cfg), max_batch=max_batch,
                         **kwargs)


def last_logits(generator: StaticGenerator, prompts: Sequence[Sequence[int]]) -> np.ndarray:
  """float32[len(prompts), V]: the logits after each prompt's last token, from one prefill."""
  ps = generator.page_size
  seq = buckets.pick(max(len(p) for p in prompts),
                     buckets.length_buckets(generator.limits.max_prefill_length, ps))
  tokens = np.zeros((len(prompts), seq), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  result = generator.steps.prefill(generator.model.params, tokens, lengths,
                                   SamplingArrays.from_params([], len(prompts)))
  return np.asarray(result.logits)


def random_prompts(lengths: Sequence[int], vocab: int, seed: int = 0, low: int = 3):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(low, vocab, n)] for n in lengths]


def hf_greedy(hf_model, prompt: Sequence[int], max_new_tokens: int, eos_ids=()):
  """transformers' greedy continuation, cut after the first EOS (as the engine stops there)."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([list(prompt)]), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
  for i, t in enumerate(out):
    if t in eos_ids:
      return out[:i + 1]
  return out


def hf_last_logits(hf_model, prompt: Sequence[int]) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return hf_model(torch.tensor([list(prompt)])).logits[0, -1].float().numpy()
