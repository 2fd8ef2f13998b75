"""Requests, their outputs, and the checks every request passes before it reaches a device."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams
from disagg_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Limits:
  """Length limits of an engine configuration (tokens)."""
  max_seq_len: int  # prompt + generated tokens
  max_prefill_length: int  # prompt tokens

  def __post_init__(self):
    if self.max_prefill_length > self.max_seq_len:
      raise ValueError(f"max_prefill_length={self.max_prefill_length} exceeds "
                       f"max_seq_len={self.max_seq_len}")

  @classmethod
  def for_model(cls, cfg: ModelConfig, max_seq_len: int = 0,
                max_prefill_length: int = 0) -> "Limits":
    """0 means "as much as the model allows"; a sliding window caps the length (it is not
    implemented, so no sequence may outgrow it)."""
    model_max = cfg.max_position_embeddings
    if cfg.sliding_window:
      model_max = min(model_max, cfg.sliding_window)
    seq = max_seq_len or model_max
    if seq > model_max:
      raise ValueError(f"max_seq_len={seq} exceeds the model's limit of {model_max} tokens "
                       "(max_position_embeddings, or sliding_window if smaller)")
    return cls(max_seq_len=seq, max_prefill_length=min(max_prefill_length or seq, seq))


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
  """A generated token's log-probability under the model and, when asked for, the most likely
  tokens' (`top`: (token id, log-probability), most likely first)."""
  logprob: float
  top: tuple[tuple[int, float], ...] = ()

  def to_json(self) -> list:
    return [self.logprob, [[i, v] for i, v in self.top]]

  @classmethod
  def from_json(cls, value) -> "TokenLogprob | None":
    if value is None:
      return None
    logprob, top = value
    return cls(float(logprob), tuple((int(i), float(v)) for i, v in top))


class HostLogprobs:
  """A step's `sampling.LogprobArrays` read to the host; `row(i, sampling)` is row i's
  `TokenLogprob` for a request with those settings (None if it did not ask)."""

  def __init__(self, arrays):
    self.logprob, self.top_ids, self.top_logprobs = (np.asarray(a) for a in arrays)

  @classmethod
  def read(cls, arrays, sampling: Sequence[SamplingParams]) -> "HostLogprobs | None":
    """Reads `arrays` (waiting for them) only if some request asked for log-probabilities."""
    if arrays is None or all(p.logprobs is None for p in sampling):
      return None
    return cls(arrays)

  def row(self, i: int, sampling: SamplingParams) -> TokenLogprob | None:
    n = sampling.logprobs
    if n is None:
      return None
    return TokenLogprob(float(self.logprob[i]),
                        tuple((int(t), float(v)) for t, v in zip(self.top_ids[i, :n],
                                                                 self.top_logprobs[i, :n])))


@dataclasses.dataclass
class RequestOutput:
  """What a request produced. finish_reason: "stop" (EOS or a stop id, which is the last output
  token), "length" (max_new_tokens or max_seq_len), "abort", or "error" (with `error` set)."""
  request_id: str
  prompt_token_ids: list[int]
  output_token_ids: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  text: str = ""
  error: str | None = None
  metrics: object = None  # RequestMetrics when produced by the serving engine
  # One per output token when SamplingParams.logprobs was set, else None.
  logprobs: list[TokenLogprob] | None = None

  def to_json(self) -> dict:
    out = {"prompt_token_ids": list(self.prompt_token_ids),
           "output_token_ids": list(self.output_token_ids),
           "text": self.text,
           "finish_reason": self.finish_reason}
    if self.error is not None:
      out["error"] = self.error
    if self.logprobs is not None:
      out["logprobs"] = [lp.to_json() for lp in self.logprobs]
    return out


def validate(prompt_token_ids: Sequence[int], sampling: SamplingParams, cfg: ModelConfig,
             limits: Limits) -> None:
  """Raises InvalidRequestError naming the bad value and the limit."""
  if not isinstance(sampling, SamplingParams):
    raise InvalidRequestError(f"sampling must be SamplingParams, got {type(sampling).__name__}")
  n = len(prompt_token_ids)
  if n == 0:
    raise InvalidRequestError("prompt is empty; at least one token is needed")
  if n > limits.max_prefill_length:
    raise InvalidRequestError(
        f"prompt has {n} tokens; max_prefill_length is {limits.max_prefill_length} "
        "(--config.engine.max_prefill_length)")
  for i, t in enumerate(prompt_token_ids):
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size:
      raise InvalidRequestError(
          f"prompt token {i} is {t!r}, outside the vocabulary [0, {cfg.vocab_size})")
  if n + sampling.max_new_tokens > limits.max_seq_len:
    raise InvalidRequestError(
        f"prompt ({n} tokens) + max_new_tokens ({sampling.max_new_tokens}) = "
        f"{n + sampling.max_new_tokens} exceeds max_seq_len {limits.max_seq_len} "
        "(--config.engine.max_seq_len)", param="max_tokens")
  for t in sampling.stop_token_ids:
    if t >= cfg.vocab_size:
      raise InvalidRequestError(
          f"stop token id {t} is outside the vocabulary [0, {cfg.vocab_size})", param="stop")


def stop_ids(sampling: SamplingParams, cfg: ModelConfig) -> frozenset[int]:
  ids = set(sampling.stop_token_ids)
  if not sampling.ignore_eos:
    ids.update(cfg.eos_token_ids)
  return frozenset(ids)
