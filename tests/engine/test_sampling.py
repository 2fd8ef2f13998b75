import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from disagg_jax.engine import sampling as sampling_module
from disagg_jax.engine.sampling import (K_MAX, InvalidRequestError, SamplingArrays, SamplingParams,
                                        sample)
from disagg_jax.parallel.mesh import make_mesh


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
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\], got 1.5"),
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


def test_min_p_drops_the_unlikely_tokens_on_both_paths():
  """p = [0.5, 0.25, 0.15, 0.1]: min_p=0.25 keeps p >= 0.125, the first three, renormalized;
  with top_p < 1 (the candidates path) as with the whole vocabulary (the Gumbel path)."""
  n = 4000
  logits = jnp.tile(jnp.log(jnp.array([0.5, 0.25, 0.15, 0.1]))[None], (n, 1))
  positions = jnp.zeros(n, jnp.int32)
  for top_p in (1.0, 0.99):
    rows = SamplingArrays.from_params(
        [SamplingParams(temperature=1.0, seed=s, min_p=0.25, top_p=top_p) for s in range(n)], n)
    counts = np.bincount(np.asarray(sample(logits, rows, positions)), minlength=4) / n
    np.testing.assert_allclose(counts, [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0], atol=0.03)
  # One row with min_p among rows without: only that row is filtered.
  params = [SamplingParams(temperature=1.0, seed=s, min_p=0.6 if s == 0 else 0.0)
            for s in range(n)]
  tokens = np.asarray(sample(logits, SamplingArrays.from_params(params, n), positions))
  assert tokens[0] == 0 and len(set(tokens[1:].tolist())) == 4


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


# ---------------------------------------------------------------- the full-sort sampler, as before


def _reference_sample(logits, sampling, positions, max_rank=None):
  """The sampler before K_MAX (sort everything), verbatim; max_rank additionally keeps only the
  first max_rank ranks (the documented truncation of a nucleus larger than K_MAX)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample_row(row_logits, temperature, top_k, top_p, seed, position):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), position)
    vocab = row_logits.shape[-1]
    scaled = row_logits / jnp.where(temperature > 0, temperature, 1.0)
    sorted_logits, order = jax.lax.top_k(scaled, vocab)
    rank = jnp.arange(vocab)
    keep = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf))
    # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
    keep = keep & ((jnp.cumsum(probs) - probs) < top_p)
    if max_rank is not None:
      keep = keep & (rank < max_rank)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice].astype(jnp.int32)

  sampled = jax.vmap(sample_row)(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                 sampling.seed, positions)
  return jnp.where(sampling.temperature > 0, sampled, greedy)


_reference = jax.jit(_reference_sample, static_argnames="max_rank")
_sample = jax.jit(sample)


def _nucleus_sizes(logits, sampling):
  """How many ranks the reference keeps in each row (numpy, float64), to check a test's premise."""
  sizes = []
  for row, t, k, p in zip(np.asarray(logits, np.float64), sampling.temperature, sampling.top_k,
                          sampling.top_p):
    if t <= 0:
      sizes.append(1)
      continue
    ranked = np.sort(row / t)[::-1][:k if k > 0 else None]
    probs = np.exp(ranked - ranked[0])
    probs /= probs.sum()
    sizes.append(int(np.sum(np.cumsum(probs) - probs < p)))
  return np.array(sizes)


def _peaked_logits(rng, batch, vocab=4096, head=100):
  """Random logits whose mass sits in `head` random tokens (the tail holds < 0.1% at T <= 1.3)."""
  logits = rng.standard_normal((batch, vocab)).astype(np.float32)
  for row in logits:
    row[rng.choice(vocab, head, replace=False)] += 14.0
  return logits


def _rows(rng, batch, temperature, top_k, top_p):
  """SamplingArrays whose rows draw each setting from the given choices, with random seeds."""
  pick = lambda choices, dtype: np.asarray(rng.choice(choices, batch), dtype)
  return SamplingArrays(pick(temperature, np.float32), pick(top_k, np.int32),
                        pick(top_p, np.float32),
                        rng.integers(0, 2**32, batch, dtype=np.uint64).astype(np.uint32))


def _assert_same_tokens(logits, sampling, positions, **reference_kwargs):
  logits = jnp.asarray(logits)
  positions = jnp.asarray(positions, jnp.int32)
  got = np.asarray(_sample(logits, sampling, positions))
  want = np.asarray(_reference(logits, sampling, positions, **reference_kwargs))
  mismatched = np.flatnonzero(got != want)
  assert not mismatched.size, (
      f"rows {mismatched.tolist()} differ: got {got[mismatched].tolist()}, "
      f"want {want[mismatched].tolist()}")
  return got


@pytest.mark.parametrize("temperature, top_k, top_p", [
    ([0.0], [0], [1.0]),                         # greedy
    ([0.7, 1.0, 1.3], [1], [1.0]),
    ([0.7, 1.0, 1.3], [5], [1.0]),
    ([0.7, 1.0, 1.3], [K_MAX], [1.0]),
    ([0.7, 1.0, 1.3], [0], [0.3, 0.6, 0.9, 0.99]),    # nucleus within the head (< K_MAX)
    ([0.7, 1.0], [5, 50, K_MAX], [0.5, 0.95]),      # both
    ([0.7, 1.0], [1000, 4095, 4096, 9999], [0.5, 0.9, 0.99]),  # top_k > K_MAX, nucleus fits
])
def test_same_tokens_as_the_full_sort_when_the_kept_set_fits(temperature, top_k, top_p):
  rng = np.random.default_rng(zlib.crc32(repr((temperature, top_k, top_p)).encode()))
  batch = 64
  for _ in range(3):
    logits = _peaked_logits(rng, batch)
    sampling = _rows(rng, batch, temperature, top_k, top_p)
    assert (_nucleus_sizes(logits, sampling) <= K_MAX).all()  # the premise: the bound is not hit
    positions = rng.integers(0, 100_000, batch)
    tokens = _assert_same_tokens(logits, sampling, positions)
    if max(temperature) > 0 and max(top_k) != 1:
      assert len(set(tokens.tolist())) > 1  # really sampling


def test_mixed_batches_match_the_full_sort_row_for_row():
  rng = np.random.default_rng(7)
  batch = 96
  for ties in (False, True):
    for _ in range(3):
      logits = _peaked_logits(rng, batch, vocab=3000, head=150)
      if ties:  # bf16 logits, upcast: many exact ties, broken by token id
        logits = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
      sampling = _rows(rng, batch, [0.0, 0.0, 0.5, 1.0], [0, 1, 7, K_MAX, 400],
                       [1.0, 0.2, 0.8, 0.97])
      # Plain temperature sampling and top_k > K_MAX at top_p 1 take the unsorted path (other
      # tokens, same distribution): make those rows greedy here; they are tested below.
      unsorted = (sampling.top_p >= 1) & ((sampling.top_k <= 0) | (sampling.top_k > K_MAX))
      sampling.temperature[unsorted] = 0.0
      assert (sampling.temperature == 0).any() and (sampling.temperature > 0).any()
      assert (_nucleus_sizes(logits, sampling) <= K_MAX).all()
      _assert_same_tokens(logits, sampling, rng.integers(0, 100_000, batch))


def test_a_nucleus_larger_than_k_max_is_truncated_to_the_candidates():
  rng = np.random.default_rng(3)
  batch = 64
  differs = 0
  for _ in range(3):
    logits = 0.3 * rng.standard_normal((batch, 2000)).astype(np.float32)  # flat: huge nuclei
    sampling = _rows(rng, batch, [0.8, 1.0], [0, 400, 1500], [0.9, 0.99])
    assert (_nucleus_sizes(logits, sampling) > K_MAX).all()  # the premise: the bound is hit
    positions = rng.integers(0, 100_000, batch)
    # The documented rule: today's kept set cut to its first K_MAX ranks, with the same noise.
    tokens = _assert_same_tokens(logits, sampling, positions, max_rank=K_MAX)
    ranks = np.argsort(np.argsort(-logits, axis=1, kind="stable"), axis=1)
    assert (ranks[np.arange(batch), tokens] < K_MAX).all()
    untruncated = _reference(jnp.asarray(logits), sampling, jnp.asarray(positions, jnp.int32))
    differs += int((np.asarray(untruncated) != tokens).sum())
  assert differs > 0  # the cut matters: the full sort draws beyond rank K_MAX


def _rank_frequencies(row, tokens, edges):
  """Share of `tokens` in each bucket of ranks of `row` (rank 0: its largest logit)."""
  ranks = np.argsort(np.argsort(-row, kind="stable"), kind="stable")[tokens]
  return np.histogram(ranks, bins=edges)[0] / len(tokens)


def test_plain_temperature_sampling_follows_the_whole_distribution():
  # One flat row, half its mass beyond rank K_MAX, drawn with 4000 seeds: the unsorted path.
  n, vocab = 4000, 1024
  row = np.random.default_rng(0).permutation(np.log(np.linspace(1.0, 0.5, vocab))).astype(
      np.float32)
  logits = jnp.tile(jnp.asarray(row)[None], (n, 1))
  positions = jnp.full(n, 11, jnp.int32)
  params = [SamplingParams(temperature=1.0, seed=s) for s in range(n)]
  edges = [0, 128, K_MAX, 512, 700, vocab]
  by_rank = np.exp(np.sort(row)[::-1].astype(np.float64))
  bucket_mass = lambda probs: [probs[a:b].sum() / probs.sum() for a, b in zip(edges, edges[1:])]
  assert sum(bucket_mass(by_rank)[2:]) > 0.4  # the premise: much mass beyond the candidates
  tokens = np.asarray(_sample(logits, SamplingArrays.from_params(params, n), positions))
  np.testing.assert_allclose(_rank_frequencies(row, tokens, edges), bucket_mass(by_rank),
                             atol=0.03)

  # top_k > K_MAX at top_p 1: exactly the top_k set (no token beyond rank 700), in proportion.
  params = [p.replace(top_k=700) for p in params]
  tokens = np.asarray(_sample(logits, SamplingArrays.from_params(params, n), positions))
  frequencies = _rank_frequencies(row, tokens, edges)
  assert frequencies[-1] == 0
  np.testing.assert_allclose(frequencies, bucket_mass(np.where(np.arange(vocab) < 700, by_rank, 0)),
                             atol=0.03)


def test_an_all_greedy_batch_runs_only_the_argmax():
  batch, vocab = 4, 1000
  arrays = _arrays(batch)
  jaxpr = jax.make_jaxpr(sample)(jnp.zeros((batch, vocab)), arrays, jnp.zeros(batch, jnp.int32))

  def primitives(eqns):
    """Names of the primitives in eqns and in every jaxpr nested in their parameters."""
    names = []
    for eqn in eqns:
      names.append(eqn.primitive.name)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
          if hasattr(sub, "eqns"):
            names += primitives(sub.eqns)
    return names

  expensive = {"top_k", "sort", "threefry2x32", "random_bits", "cumsum"}
  top = jaxpr.jaxpr.eqns
  # Outside the one batch-level cond: the argmax and its predicate only.
  outside = primitives([e for e in top if e.primitive.name != "cond"])
  assert not expensive & set(outside), outside
  assert "argmax" in outside and "reduce_or" in outside
  (cond,) = [e for e in top if e.primitive.name == "cond"]
  greedy_branch, sampled_branch = cond.params["branches"]  # index 0: the predicate is False
  assert not expensive & set(primitives(greedy_branch.jaxpr.eqns))
  assert {"top_k", "random_bits"} <= set(primitives(sampled_branch.jaxpr.eqns))
  # The predicate is any(temperature > 0): all-greedy picks branch 0, and returns the argmax.
  logits = jax.random.normal(jax.random.PRNGKey(5), (batch, vocab))
  assert (np.asarray(_sample(logits, arrays, jnp.zeros(batch, jnp.int32)))
          == np.asarray(jnp.argmax(logits, -1))).all()


def test_a_row_samples_the_same_whatever_its_neighbours_on_every_path():
  rng = np.random.default_rng(11)
  batch = 12
  logits = jnp.asarray(_peaked_logits(rng, batch, vocab=1500, head=40) / 3)
  settings = [dict(temperature=1.0), dict(temperature=0.9, top_k=600),
              dict(temperature=1.1, top_p=0.9), dict(temperature=0.7, top_k=20, top_p=0.95),
              dict(temperature=0.8, top_k=900, top_p=0.8), dict()]
  params = [SamplingParams(seed=int(s), **settings[i % len(settings)])
            for i, s in enumerate(rng.integers(0, 2**32, batch))]
  positions = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  together = np.asarray(_sample(logits, SamplingArrays.from_params(params, batch), positions))
  for i in range(batch):
    alone = _sample(logits[i:i + 1], SamplingArrays.from_params([params[i]], 1), positions[i:i + 1])
    assert int(alone[0]) == together[i], (i, params[i])


@pytest.mark.skipif(jax.device_count() < 4, reason="needs four devices")
@pytest.mark.parametrize("spec", [P(None, "tp"), P("dp", "tp")])
def test_vocabulary_sharded_over_tp_samples_the_same(spec):
  mesh = make_mesh(jax.devices()[:4], tp=2)
  rng = np.random.default_rng(5)
  batch = 16
  logits = jnp.asarray(_peaked_logits(rng, batch, vocab=2048, head=60))
  sampling = _rows(rng, batch, [0.0, 0.8, 1.0], [0, 5, 600], [1.0, 0.9])
  positions = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)
  sharded = jax.device_put(logits, NamedSharding(mesh, spec))
  got = np.asarray(jax.jit(sample)(sharded, sampling, positions))
  np.testing.assert_array_equal(got, np.asarray(_sample(logits, sampling, positions)))
  greedy = sampling._replace(temperature=np.zeros(batch, np.float32))
  np.testing.assert_array_equal(np.asarray(jax.jit(sample)(sharded, greedy, positions)),
                                np.asarray(jnp.argmax(logits, -1)))


def test_rank_noise_is_the_noise_categorical_adds_to_the_first_ranks():
  vocab = 5000
  for seed in range(4):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 17 * seed)
    full = np.asarray(jax.random.gumbel(key, (vocab,), jnp.float32))[:K_MAX]
    np.testing.assert_array_equal(
        np.asarray(sampling_module._rank_noise(key, vocab, K_MAX, jnp.float32)), full)
    if hasattr(jax, "threefry_partitionable"):
      with jax.threefry_partitionable(False):  # the slicing fallback
        full = np.asarray(jax.random.gumbel(key, (vocab,), jnp.float32))[:K_MAX]
        np.testing.assert_array_equal(
            np.asarray(sampling_module._rank_noise(key, vocab, K_MAX, jnp.float32)), full)


def test_top_k_mask_is_the_first_k_ranks_of_the_sort():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((6, 3000)).astype(np.float32)
  x[:3] = np.asarray(jnp.asarray(x[:3]).astype(jnp.bfloat16).astype(jnp.float32))  # ties
  x[4, 100:] = -np.inf
  x[5, :] = 0.0
  x[5, ::2] = -0.0
  for k in (1, 2, 257, 1000, 2999, 3000):
    ks = jnp.full(6, k, jnp.int32)
    mask = np.asarray(jax.jit(sampling_module._top_k_mask)(jnp.asarray(x), ks))
    for row in range(6):
      _, order = jax.lax.top_k(jnp.asarray(x[row]), k)
      want = np.zeros(3000, bool)
      want[np.asarray(order)] = True
      np.testing.assert_array_equal(mask[row], want, err_msg=f"row {row}, k {k}")
