"""Sampling parameters (validated on the host) and the sampler (pure, inside the step functions).

Randomness is keyed by (request seed, position of the token being consumed), so a request samples
the same tokens whatever batch, slot or mode it runs in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_SEED = 2**32


class InvalidRequestError(ValueError):
  """A request the engine refuses, with the offending value and the accepted range."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request generation settings. temperature 0 is greedy; top_k 0 and top_p 1 disable them."""

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False

  def __post_init__(self):
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
    self.validate()

  def validate(self) -> None:
    def bad(msg):
      raise InvalidRequestError(msg)
    if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
      bad(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
    if self.max_new_tokens < 1:
      bad(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if not isinstance(self.temperature, (int, float)) or math.isnan(self.temperature):
      bad(f"temperature must be a number >= 0, got {self.temperature!r}")
    if self.temperature < 0 or math.isinf(self.temperature):
      bad(f"temperature must be finite and >= 0, got {self.temperature}")
    if (not isinstance(self.top_p, (int, float)) or math.isnan(self.top_p)
        or not 0 < self.top_p <= 1):
      bad(f"top_p must be in (0, 1], got {self.top_p!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
      bad(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    for t in self.stop_token_ids:
      if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        bad(f"stop_token_ids must be non-negative integers, got {t!r}")

  def replace(self, **changes) -> "SamplingParams":
    return dataclasses.replace(self, **changes)


class SamplingArrays(NamedTuple):
  """Per-row sampling settings on device: temperature f32[B], top_k i32[B], top_p f32[B], seed u32[B]."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array

  @classmethod
  def from_params(cls, params: Sequence[SamplingParams | None], batch: int) -> "SamplingArrays":
    """Host arrays for `batch` rows; missing rows are greedy."""
    temperature = np.zeros(batch, np.float32)
    top_k = np.zeros(batch, np.int32)
    top_p = np.ones(batch, np.float32)
    seed = np.zeros(batch, np.uint32)
    for i, p in enumerate(params):
      if p is not None:
        temperature[i], top_k[i], top_p[i], seed[i] = p.temperature, p.top_k, p.top_p, p.seed
    return cls(temperature, top_k, top_p, seed)


def sample(logits: jax.Array, sampling: SamplingArrays, positions: jax.Array) -> jax.Array:
  """logits float32[B, V]; positions int32[B] (the position each row just consumed) -> int32[B]."""
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
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf))
    return order[choice].astype(jnp.int32)

  sampled = jax.vmap(sample_row)(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                 sampling.seed, positions)
  return jnp.where(sampling.temperature > 0, sampled, greedy)
