"""Sampling parameters (validated on the host) and the sampler (pure, inside the step functions).

Randomness is keyed by (request seed, position of the token being consumed), so a request samples
the same tokens whatever batch, slot or mode it runs in.

The rule (docs/SAMPLING.md): a row with temperature 0 takes the argmax. A sampling row scales its
logits by 1 / temperature, ranks the vocabulary by scaled logit (ties: lower token id first), keeps
rank r iff (top_k == 0 or r < top_k) and the probability mass of the ranks before r is below top_p
(probabilities: the softmax over the ranks top_k keeps), and draws among the kept ranks with
gumbel-max, the noise of rank r being `gumbel(fold_in(PRNGKey(seed), position), (V,))[r]`, as
`jax.random.categorical` over the fully sorted vocabulary would.

Nothing sorts the vocabulary. When no row samples, only the argmax runs (a batch-level
`lax.cond`). Otherwise rows draw from a bounded candidate set, the K_MAX = 256 largest scaled
logits (`lax.top_k`), with the rule's probabilities (normalised over the whole vocabulary, or
over the top_k set), so a row draws the very token the full sort would whenever its kept set lies
within the top K_MAX ranks: 0 < top_k <= K_MAX, or a top_p nucleus of at most K_MAX tokens.
Where the bound is hit:
  * top_p == 1 and top_k == 0 (plain temperature sampling) or top_k > K_MAX: gumbel-max over the
    unsorted vocabulary (restricted to the exact top_k set, found by a 32-step bisection on the
    logits' bits, for top_k > K_MAX): the exact distribution, other tokens than a sort would draw.
  * top_p < 1 with a nucleus of more than K_MAX tokens (top_k 0 or > K_MAX): the nucleus is
    truncated to its K_MAX most likely tokens, drawn in proportion to their probabilities.
Rows choose between these with `jnp.where`; each path runs only when some row of the batch needs
it (batch-level conds), so shapes never depend on the data and logits may stay sharded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_SEED = 2**32

# The candidate set of a sampling row: its K_MAX largest scaled logits. 256 covers the usual top_k
# settings and the nucleus of a confident distribution; lax.top_k(x, 256) costs about 2 argmaxes,
# ~1/50 of the full sort, at V=49,152 on CPU (docs/SAMPLING.md has the figures and the bound).
K_MAX = 256
# The most alternatives a request may ask log-probabilities of (`SamplingParams.logprobs`), as
# vLLM's default max_logprobs and OpenAI's top_logprobs limit; every step computes this many.
MAX_LOGPROBS = 20
# Penalties (vLLM's): a row's history int32[V] holds how often each token was generated so far,
# plus PROMPT_FLAG if the token is in the prompt (`history_row`; the decode side keeps one per
# slot on device). presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY].
PROMPT_FLAG = 1 << 24
MAX_PENALTY = 2.0


class InvalidRequestError(ValueError):
  """A request the engine refuses, with the offending value and the accepted range; `param`
  names the request field at fault (the HTTP server reports it), when known."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-request generation settings. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0
  disable them (min_p: tokens less likely than min_p times the most likely one are dropped).
  logprobs: None, none returned; N in [0, MAX_LOGPROBS], each generated token comes with its own
  log-probability and the N most likely tokens' (log-softmax of the model's logits, before
  temperature and the other settings, as vLLM's default).
  Penalties, as vLLM applies them to the logits before everything else: repetition_penalty r
  (1: off) divides the positive logits of tokens in the prompt or generated so far by r and
  multiplies their negative ones by r; frequency_penalty f and presence_penalty p (0: off)
  subtract f x (times the token was generated) and p x (1 if it was generated at all)."""

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int = 0
  min_p: float = 0.0
  stop_token_ids: tuple[int, ...] = ()
  ignore_eos: bool = False
  logprobs: int | None = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0

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
    if (not isinstance(self.min_p, (int, float)) or math.isnan(self.min_p)
        or not 0 <= self.min_p <= 1):
      bad(f"min_p must be in [0, 1], got {self.min_p!r}")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      bad(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
      bad(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
    if self.logprobs is not None and (
        isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
        or not 0 <= self.logprobs <= MAX_LOGPROBS):
      bad(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
    for name in ("presence_penalty", "frequency_penalty"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
          or not -MAX_PENALTY <= value <= MAX_PENALTY):
        bad(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
    value = self.repetition_penalty
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
        or math.isinf(value) or value <= 0):
      bad(f"repetition_penalty must be a finite number > 0 (1 disables it), got {value!r}")
    for t in self.stop_token_ids:
      if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        bad(f"stop_token_ids must be non-negative integers, got {t!r}")

  def replace(self, **changes) -> "SamplingParams":
    return dataclasses.replace(self, **changes)

  @property
  def penalized(self) -> bool:
    """Whether any penalty applies (the request's history is then kept on device)."""
    return (self.presence_penalty != 0 or self.frequency_penalty != 0
            or self.repetition_penalty != 1)


class SamplingArrays(NamedTuple):
  """Per-row sampling settings on device: temperature f32[B], top_k i32[B], top_p f32[B],
  seed u32[B], min_p f32[B] (None: 0 for every row), logprobs i32[B] (-1: none wanted; None:
  no row wants them, and the steps do not even test for it), presence / frequency / repetition
  penalties f32[B] (None: none), and for a prefill step prompt_len i32[B], how many of each
  row's tokens are the prompt (the rest are generated tokens recomputed after a preemption;
  None: all)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array
  min_p: jax.Array | None = None
  logprobs: jax.Array | None = None
  presence: jax.Array | None = None
  frequency: jax.Array | None = None
  repetition: jax.Array | None = None
  prompt_len: jax.Array | None = None

  @classmethod
  def from_params(cls, params: Sequence[SamplingParams | None], batch: int,
                  prompt_lens: Sequence[int] | None = None) -> "SamplingArrays":
    """Host arrays for `batch` rows; missing rows are greedy. `prompt_lens` (prefill steps):
    each row's prompt length, when its tokens may include generated ones."""
    temperature = np.zeros(batch, np.float32)
    top_k = np.zeros(batch, np.int32)
    top_p = np.ones(batch, np.float32)
    seed = np.zeros(batch, np.uint32)
    min_p = np.zeros(batch, np.float32)
    logprobs = np.full(batch, -1, np.int32)
    presence, frequency = np.zeros(batch, np.float32), np.zeros(batch, np.float32)
    repetition = np.ones(batch, np.float32)
    prompt_len = None
    if prompt_lens is not None:
      prompt_len = np.zeros(batch, np.int32)
      prompt_len[:len(prompt_lens)] = prompt_lens
    for i, p in enumerate(params):
      if p is not None:
        temperature[i], top_k[i], top_p[i], seed[i] = p.temperature, p.top_k, p.top_p, p.seed
        min_p[i] = p.min_p
        logprobs[i] = -1 if p.logprobs is None else p.logprobs
        presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
        repetition[i] = p.repetition_penalty
    return cls(temperature, top_k, top_p, seed, min_p, logprobs, presence, frequency, repetition,
               prompt_len)


class LogprobArrays(NamedTuple):
  """Per-row log-probabilities a step returns beside its tokens: logprob f32[B] (the sampled
  token's), top_ids i32[B, MAX_LOGPROBS] and top_logprobs f32[B, MAX_LOGPROBS] (the most likely
  tokens, most likely first). Zeros for rows that did not ask (or when no row did)."""
  logprob: jax.Array
  top_ids: jax.Array
  top_logprobs: jax.Array

  @classmethod
  def zeros(cls, batch: int) -> "LogprobArrays":
    return cls(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, MAX_LOGPROBS), jnp.int32),
               jnp.zeros((batch, MAX_LOGPROBS), jnp.float32))

  def at_set(self, index, values: "LogprobArrays", **kwargs) -> "LogprobArrays":
    """These arrays with rows `index` set to `values` (`.at[index].set(...)` on each)."""
    return LogprobArrays(*(a.at[index].set(v, **kwargs) for a, v in zip(self, values)))

  def where(self, keep, other: "LogprobArrays") -> "LogprobArrays":
    """Rows where `keep` (bool[B]) from these arrays, the others from `other`."""
    return LogprobArrays(*(jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - 1)), a, b)
                           for a, b in zip(self, other)))


def token_logprobs(logits: jax.Array, tokens: jax.Array,
                   sampling: SamplingArrays) -> LogprobArrays:
  """The log-softmax of logits f32[B, V] at tokens i32[B] and its MAX_LOGPROBS largest entries,
  computed only when some row asks (a batch-level cond); zeros otherwise."""
  batch = logits.shape[0]
  if sampling.logprobs is None:
    return LogprobArrays.zeros(batch)

  def compute():
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = jax.lax.top_k(logp, min(MAX_LOGPROBS, logp.shape[-1]))
    pad = MAX_LOGPROBS - top_ids.shape[-1]  # a vocabulary smaller than MAX_LOGPROBS
    if pad:
      top_ids = jnp.pad(top_ids, ((0, 0), (0, pad)))
      top_logprobs = jnp.pad(top_logprobs, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    return LogprobArrays(chosen, top_ids.astype(jnp.int32), top_logprobs)
  return jax.lax.cond(jnp.any(jnp.asarray(sampling.logprobs) >= 0), compute,
                      lambda: LogprobArrays.zeros(batch))


def sample_with_logprobs(logits: jax.Array, sampling: SamplingArrays, positions: jax.Array,
                         history: jax.Array | None = None,
                         history_rows: jax.Array | None = None) -> tuple[jax.Array, LogprobArrays]:
  """`sample` of the logits penalized by each row's history (`apply_penalties`; None: no
  penalties), and the log-probabilities of what it drew (`token_logprobs`, of the logits as the
  model gave them)."""
  tokens = sample(apply_penalties(logits, history, sampling, history_rows), sampling, positions)
  return tokens, token_logprobs(logits, tokens, sampling)


def history_row(prompt_ids: Sequence[int], output_ids: Sequence[int], vocab: int) -> np.ndarray:
  """A sequence's penalty history int32[vocab] (on the host): PROMPT_FLAG at its prompt's
  tokens, plus how often each token was generated."""
  row = np.zeros(vocab, np.int32)
  row[np.asarray(prompt_ids, np.int64)] = PROMPT_FLAG
  np.add.at(row, np.asarray(output_ids, np.int64), 1)
  return row


def prompt_history(tokens: jax.Array, lengths: jax.Array, sampling: SamplingArrays,
                   vocab: int) -> jax.Array | None:
  """The penalty history int32[B, vocab] of a prefill batch's rows (tokens int32[B, S], the
  first lengths[b] real; the first sampling.prompt_len[b] the prompt, all when None), built
  only when some row is penalized; None when the settings carry no penalties."""
  if sampling.presence is None:
    return None
  b, s = tokens.shape

  def build():
    position = jnp.arange(s, dtype=jnp.int32)[None, :]
    real = position < lengths[:, None]
    prompt_len = lengths if sampling.prompt_len is None else jnp.asarray(sampling.prompt_len)
    in_prompt = real & (position < prompt_len[:, None])
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, s))
    history = jnp.zeros((b, vocab), jnp.int32)
    history = history.at[rows, tokens].max(jnp.where(in_prompt, PROMPT_FLAG, 0))
    return history.at[rows, tokens].add((real & ~in_prompt).astype(jnp.int32))
  return jax.lax.cond(_any_penalty(sampling), build, lambda: jnp.zeros((b, vocab), jnp.int32))


def record_tokens(history: jax.Array | None, rows: jax.Array, tokens: jax.Array,
                  counted: jax.Array) -> jax.Array | None:
  """The history with tokens[i] generated once more by row rows[i] where counted[i] (rows past
  the batch are dropped)."""
  if history is None:
    return None
  return history.at[rows, tokens].add(counted.astype(jnp.int32), mode="drop")


def _any_penalty(sampling: SamplingArrays):
  return jnp.any((jnp.asarray(sampling.presence) != 0) | (jnp.asarray(sampling.frequency) != 0)
                 | (jnp.asarray(sampling.repetition) != 1))


def apply_penalties(logits: jax.Array, history: jax.Array | None, sampling: SamplingArrays,
                    rows: jax.Array | None = None) -> jax.Array:
  """logits f32[B, V] with each row's penalties applied (vLLM's rule, `SamplingParams`) given
  its history: history int32[B, V], or history[rows] (rows int32[B]; gathered only when some row
  is penalized: a batch-level cond skips everything otherwise)."""
  if history is None or sampling.presence is None:
    return logits

  def penalize():
    rows_history = history if rows is None else history[rows]
    count = (rows_history % PROMPT_FLAG).astype(logits.dtype)
    repetition = jnp.asarray(sampling.repetition)[:, None].astype(logits.dtype)
    seen = rows_history > 0
    out = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition),
                    logits)
    return (out - jnp.asarray(sampling.frequency)[:, None] * count
            - jnp.asarray(sampling.presence)[:, None] * (count > 0).astype(logits.dtype))
  return jax.lax.cond(_any_penalty(sampling), penalize, lambda: logits)


def sample(logits: jax.Array, sampling: SamplingArrays, positions: jax.Array) -> jax.Array:
  """logits float32[B, V]; positions int32[B] (the position each row just consumed) -> int32[B]."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  temperature = jnp.asarray(sampling.temperature)
  return jax.lax.cond(jnp.any(temperature > 0),
                      lambda: _sample_rows(logits, sampling, positions, greedy),
                      lambda: greedy)


def _sample_rows(logits, sampling: SamplingArrays, positions, greedy):
  batch, vocab = logits.shape
  cands = min(K_MAX, vocab)
  temperature = jnp.asarray(sampling.temperature)
  top_k = jnp.asarray(sampling.top_k)
  top_p = jnp.asarray(sampling.top_p)
  sampling_row = temperature > 0
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  keys = jax.vmap(lambda seed, position: jax.random.fold_in(jax.random.PRNGKey(seed), position))(
      sampling.seed, positions)

  # top_k beyond the candidates: the exact top_k set, by bisection (only when some row asks).
  wide_k = sampling_row & (top_k > cands) & (top_k < vocab)
  in_top_k = jax.lax.cond(jnp.any(wide_k),
                          lambda: _top_k_mask(scaled, jnp.where(wide_k, top_k, vocab)),
                          lambda: jnp.ones(scaled.shape, bool))
  # min_p: p_i >= min_p * p_max, i.e. scaled_i - max(scaled) >= log(min_p) (0: keeps all).
  min_p = (jnp.zeros(batch, jnp.float32) if sampling.min_p is None
           else jnp.asarray(sampling.min_p))
  floor = jnp.where(min_p > 0, jnp.log(jnp.maximum(min_p, 1e-30)), -jnp.inf)
  in_top_k = jax.lax.cond(
      jnp.any(sampling_row & (min_p > 0)),
      lambda: in_top_k & (scaled - jnp.max(scaled, axis=-1, keepdims=True) >= floor[:, None]),
      lambda: in_top_k)

  full = sampling_row & (top_p >= 1) & ((top_k <= 0) | (top_k > cands))
  ranked = sampling_row & ~full
  none = jnp.zeros(batch, jnp.int32)
  from_candidates = jax.lax.cond(
      jnp.any(ranked),
      lambda: _sample_candidates(scaled, in_top_k, top_k, top_p, keys, cands, floor),
      lambda: none)
  from_vocab = jax.lax.cond(jnp.any(full), lambda: _sample_vocab(scaled, in_top_k, keys),
                            lambda: none)
  return jnp.where(sampling_row, jnp.where(full, from_vocab, from_candidates), greedy)


def _sample_candidates(scaled, in_top_k, top_k, top_p, keys, cands, floor):
  """The rule on the first `cands` ranks: today's full-sort token whenever the kept set fits.
  `floor`: each row's min_p bound on log(p / p_max) (-inf: none)."""
  vocab = scaled.shape[-1]
  # The first `cands` ranks of the full sort. The barriers keep XLA:CPU from fusing the top_k's
  # outputs into what follows, which turns it back into a full sort (50x slower at V=49,152); one
  # barrier per output, as the SPMD partitioner (vocabulary sharded over "tp") expects.
  values, order = jax.lax.top_k(scaled, cands)
  values, order = jax.lax.optimization_barrier(values), jax.lax.optimization_barrier(order)
  rank = jnp.arange(cands)
  keep = ((top_k[:, None] <= 0) | (rank < top_k[:, None])) & (
      values - values[:, :1] >= floor[:, None])
  # The softmax over the ranks top_k keeps, as jax.nn.softmax over the sorted vocabulary gives it:
  # those ranks are all candidates when 0 < top_k <= cands; otherwise the sum runs over the whole
  # vocabulary (or over the exact top_k set, in_top_k, when top_k > cands).
  top = values[:, :1]
  unnormalized = jnp.exp(values - top)
  total = jnp.where((top_k > 0) & (top_k <= cands),
                    jnp.sum(jnp.where(keep, unnormalized, 0), axis=-1),
                    jnp.sum(jnp.where(in_top_k, jnp.exp(scaled - top), 0), axis=-1))
  probs = jnp.where(keep, unnormalized / total[:, None], 0)
  # Keep the smallest prefix whose mass reaches top_p; the first token always stays.
  keep = keep & ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None])
  noise = jax.vmap(lambda key: _rank_noise(key, vocab, cands, scaled.dtype))(keys)
  choice = jnp.argmax(noise + jnp.where(keep, values, -jnp.inf), axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _rank_noise(key, vocab, cands, dtype):
  """gumbel(key, (vocab,), dtype)[:cands]: the noise jax.random.categorical adds to those ranks.

  With the (default) partitionable threefry, element i of a random array depends only on the key
  and i, so the first `cands` elements are drawn alone; otherwise all `vocab` are drawn and sliced.
  """
  if (getattr(jax.config, "jax_threefry_partitionable", False)
      and getattr(jax.config, "jax_default_prng_impl", None) == "threefry2x32"):
    return jax.random.gumbel(key, (cands,), dtype)
  return jax.random.gumbel(key, (vocab,), dtype)[:cands]


def _sample_vocab(scaled, in_top_k, keys):
  """Gumbel-max over the unsorted vocabulary (within in_top_k): exact, without a sort."""
  vocab = scaled.shape[-1]
  noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), scaled.dtype))(keys)
  noisy = jnp.where(in_top_k, noise + scaled, -jnp.inf)
  # argmax as max + first index reaching it: jnp.argmax fused with the noise is ~5x slower on CPU.
  best = jnp.max(noisy, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, noisy.shape, 1)
  token = jnp.min(jnp.where(noisy == best, index, vocab), axis=-1)
  return jnp.minimum(token, vocab - 1).astype(jnp.int32)


def _order_keys(x):
  """float32 -> uint32 keys ordered as the floats are (-0.0 and 0.0 alike; NaN above +inf)."""
  bits = jax.lax.bitcast_convert_type(x + jnp.zeros((), x.dtype), jnp.uint32)
  sign = jnp.uint32(1 << 31)
  return jnp.where((bits & sign) != 0, ~bits, bits | sign)


def _top_k_mask(x, k):
  """bool[B, V]: the k[b] largest entries of each row x[b] (1 <= k <= V), ties to the lower index,
  i.e. the first k ranks of lax.top_k(x[b], V), found without a sort.

  The k-th largest order key is the largest t with count(key >= t) >= k; it is built bit by bit,
  most significant first (32 passes over the row), then ties at it are kept by index.
  """
  keys = _order_keys(x.astype(jnp.float32))
  k = k.astype(jnp.int32)

  def add_bit(i, kth):
    trial = kth | jax.lax.shift_left(jnp.uint32(1), (31 - i).astype(jnp.uint32))
    enough = jnp.sum((keys >= trial[:, None]).astype(jnp.int32), axis=-1) >= k
    return jnp.where(enough, trial, kth)

  kth = jax.lax.fori_loop(0, 32, add_bit, jnp.zeros(x.shape[:1], jnp.uint32))
  above = keys > kth[:, None]
  tied = keys == kth[:, None]
  room = k - jnp.sum(above.astype(jnp.int32), axis=-1)
  crowded = jnp.sum(tied.astype(jnp.int32), axis=-1) > room  # more ties at the k-th than room

  def first_ties():
    tie_rank = jnp.cumsum(tied.astype(jnp.int32), axis=-1) - tied.astype(jnp.int32)
    return tied & (tie_rank < room[:, None])

  return above | jax.lax.cond(jnp.any(crowded), first_ties, lambda: tied)
