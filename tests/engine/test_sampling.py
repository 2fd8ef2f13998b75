import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from disagg_jax.engine.sampling import (InvalidRequestError, SamplingArrays, SamplingParams,
                                        sample)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature must be finite and >= 0, got -0.5"),
    ({"temperature": math.nan}, "temperature must be a number >= 0, got nan"),
    ({"temperature": math.inf}, "temperature must be finite"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_p": math.nan}, r"top_p must be in \(0, 1\], got nan"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ({"seed": 2**40}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ({"stop_token_ids": (3, -2)}, "stop_token_ids must be non-negative integers, got -2"),
])
def test_invalid_parameters_are_rejected(kwargs, message):
  with pytest.raises(InvalidRequestError, match=message):
    SamplingParams(**kwargs)


def _arrays(batch, **kwargs):
  return SamplingArrays.from_params([SamplingParams(**kwargs)] * batch, batch)


def test_greedy_and_degenerate_settings_pick_the_argmax():
  logits = jax.random.normal(jax.random.PRNGKey(0), (16, 50))
  positions = jnp.arange(16, dtype=jnp.int32)
  argmax = np.asarray(jnp.argmax(logits, -1))
  assert (np.asarray(sample(logits, _arrays(16), positions)) == argmax).all()
  assert (np.asarray(sample(logits, _arrays(16, temperature=1.0, top_k=1), positions))
          == argmax).all()
  assert (np.asarray(sample(logits, _arrays(16, temperature=1.0, top_p=1e-6), positions))
          == argmax).all()


def test_frequencies_follow_the_distribution_with_top_k_and_top_p():
  n = 4000
  logits = jnp.tile(jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))[None], (n, 1))
  seeds = SamplingArrays.from_params([SamplingParams(temperature=1.0, seed=s) for s in range(n)], n)
  positions = jnp.zeros(n, jnp.int32)
  counts = np.bincount(np.asarray(sample(logits, seeds, positions)), minlength=4) / n
  np.testing.assert_allclose(counts, [0.5, 0.25, 0.15, 0.1], atol=0.03)

  top2 = seeds._replace(top_k=np.full(n, 2, np.int32))
  counts = np.bincount(np.asarray(sample(logits, top2, positions)), minlength=4) / n
  np.testing.assert_allclose(counts, [2 / 3, 1 / 3, 0, 0], atol=0.03)

  # top_p=0.7 keeps the smallest prefix reaching 0.7 mass: tokens 0 and 1 (0.75).
  nucleus = seeds._replace(top_p=np.full(n, 0.7, np.float32))
  counts = np.bincount(np.asarray(sample(logits, nucleus, positions)), minlength=4) / n
  np.testing.assert_allclose(counts, [2 / 3, 1 / 3, 0, 0], atol=0.03)

  hot = seeds._replace(temperature=np.full(n, 100.0, np.float32))
  counts = np.bincount(np.asarray(sample(logits, hot, positions)), minlength=4) / n
  np.testing.assert_allclose(counts, [0.25] * 4, atol=0.03)


def test_a_row_samples_the_same_whatever_its_neighbours():
  logits = jax.random.normal(jax.random.PRNGKey(1), (8, 300))
  params = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in range(8)]
  positions = jnp.arange(8, dtype=jnp.int32) * 3
  batch = np.asarray(sample(logits, SamplingArrays.from_params(params, 8), positions))
  for i in range(8):
    alone = sample(logits[i:i + 1], SamplingArrays.from_params([params[i]], 1), positions[i:i + 1])
    assert int(alone[0]) == batch[i]
  # Another seed or another position draws differently somewhere.
  other = SamplingArrays.from_params([p.replace(seed=p.seed + 100) for p in params], 8)
  assert (np.asarray(sample(logits, other, positions)) != batch).any()
