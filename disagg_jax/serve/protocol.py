"""The OpenAI API surface this server speaks: request models (validated), errors, response bodies.

Validation errors become 400s with OpenAI's error body:
  {"error": {"message": ..., "type": "invalid_request_error", "param": ..., "code": ...}}
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from disagg_jax.engine.sampling import MAX_LOGPROBS, MAX_PENALTY
from disagg_jax.models.tokenizer import unicode_problem

MAX_STOP_SEQUENCES = 4
MAX_CHOICES = 16  # the largest `n`
# OpenAI parameters this server does not implement: a request that sets one to anything but its
# neutral value gets a 400 naming it, instead of being served as if it were not there.
UNSUPPORTED = {"best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, "")}


def _text(value: str) -> str:
  """A string field's value, refused if it cannot be UTF-8 (a lone surrogate)."""
  problem = unicode_problem(value)
  if problem:
    raise ValueError(problem)
  return value


class APIError(Exception):
  """An error with an HTTP status and OpenAI's body."""

  def __init__(self, status: int, message: str, param: str | None = None,
               type_: str = "invalid_request_error", code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
    self.headers = headers  # extra response headers (Retry-After, WWW-Authenticate)

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


class ErrorDetail(BaseModel):
  message: str
  type: str
  param: Optional[str] = None
  code: Optional[str] = None


class ErrorResponse(BaseModel):
  error: ErrorDetail


class StreamOptions(BaseModel):
  include_usage: bool = False


class _Sampling(BaseModel):
  """Fields shared by completions and chat completions. Unknown fields are ignored, as OpenAI's
  clients send some this server does not implement."""
  model_config = ConfigDict(extra="ignore")

  model: str
  max_tokens: Optional[int] = Field(default=None, ge=1, description="Tokens to generate.")
  temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
  top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
  top_k: Optional[int] = Field(default=None, ge=-1, description="Extension (as vLLM): sample "
                               "from the k most likely tokens; 0 or -1: all.")
  seed: Optional[int] = Field(default=None, ge=0, lt=2**32)
  min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0, description="Extension (as "
                                 "vLLM): drop tokens less likely than min_p times the most "
                                 "likely one.")
  stop: Optional[Union[str, list[str]]] = Field(
      default=None, description=f"A string, or at most {MAX_STOP_SEQUENCES} strings.")
  n: Optional[int] = Field(default=None, ge=1, le=MAX_CHOICES,
                           description="Choices to generate for the prompt.")
  stream: Optional[bool] = None
  stream_options: Optional[StreamOptions] = None
  ignore_eos: bool = Field(default=False, description="Extension (as vLLM): keep generating "
                           "past EOS until max_tokens.")
  presence_penalty: Optional[float] = Field(
      default=None, ge=-MAX_PENALTY, le=MAX_PENALTY, description="Subtracted from the logit of "
      "every token generated so far.")
  frequency_penalty: Optional[float] = Field(
      default=None, ge=-MAX_PENALTY, le=MAX_PENALTY, description="Times the count of each "
      "token generated so far, subtracted from its logit.")
  repetition_penalty: Optional[float] = Field(
      default=None, gt=0.0, description="Extension (as vLLM): tokens of the prompt or "
      "generated so far have positive logits divided by it, negative ones multiplied; 1: off.")

  _check_model = field_validator("model")(classmethod(lambda cls, value: _text(value)))

  @field_validator("stop")
  @classmethod
  def _stop_list(cls, value):
    if value is None:
      return None
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP_SEQUENCES:
      raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
    if any(not s for s in stops):
      raise ValueError("stop sequences must be non-empty")
    return [_text(s) for s in stops]

  @model_validator(mode="before")
  @classmethod
  def _unsupported(cls, data):
    if isinstance(data, dict):
      for name, neutral in UNSUPPORTED.items():
        value = data.get(name)
        if not any(value == v and type(value) is type(v) or value is v for v in neutral):
          raise ValueError(f"`{name}` is not supported by this server (got {value!r}); leave "
                           "it out")
    return data


class CompletionRequest(_Sampling):
  prompt: Union[str, list[int]] = Field(description="Text, or a list of token ids.",
                                        min_length=1)
  echo: Optional[bool] = Field(default=None, description="Put the prompt's text before each "
                               "choice's text.")
  logprobs: Optional[int] = Field(
      default=None, ge=0, le=MAX_LOGPROBS, strict=True,
      description="Return each generated token's log-probability and those of the `logprobs` "
      "most likely tokens at its position.")

  @model_validator(mode="after")
  def _no_prompt_logprobs(self):
    if self.echo and self.logprobs is not None:
      raise ValueError("`logprobs` with `echo` (log-probabilities of the prompt's tokens) is "
                       "not supported; leave one of them out")
    return self

  @field_validator("prompt", mode="before")
  @classmethod
  def _token_ids(cls, value):
    if isinstance(value, list) and any(isinstance(t, bool) for t in value):
      raise ValueError("prompt token ids must be integers, not true/false")
    return value

  @field_validator("prompt")
  @classmethod
  def _valid_text(cls, value):
    return _text(value) if isinstance(value, str) else value


class ContentPart(BaseModel):
  """One part of a message's content in OpenAI's list form; only text parts are served."""
  model_config = ConfigDict(extra="ignore")
  type: Literal["text"]
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="ignore")
  role: Literal["system", "user", "assistant", "developer", "tool"]
  content: Union[str, list[ContentPart]]

  @field_validator("content")
  @classmethod
  def _joined(cls, value):
    """The text of the message: list parts are joined."""
    text = value if isinstance(value, str) else "".join(part.text for part in value)
    return _text(text)


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: Optional[int] = Field(default=None, ge=1)
  logprobs: Optional[bool] = Field(default=None, description="Return each generated token's "
                                   "log-probability.")
  top_logprobs: Optional[int] = Field(
      default=None, ge=0, le=MAX_LOGPROBS, strict=True,
      description="With `logprobs`, also the log-probabilities of this many most likely "
      "tokens at each position.")

  @model_validator(mode="after")
  def _top_needs_logprobs(self):
    if self.top_logprobs and not self.logprobs:
      raise ValueError("`top_logprobs` needs `logprobs: true`")
    return self

  def num_logprobs(self) -> int | None:
    """SamplingParams.logprobs for this request."""
    return (self.top_logprobs or 0) if self.logprobs else None


def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
  """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens,
          "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(tokenizer, token_ids, logprobs, text_offset: int = 0) -> dict | None:
  """The completions API's logprobs object for tokens `token_ids` and their `TokenLogprob`s
  (None: not asked for). A token's text is its id decoded alone; `text_offset`: where the first
  one starts."""
  if logprobs is None:
    return None
  tokens, offsets = [], []
  for token in token_ids:
    offsets.append(text_offset)
    tokens.append(tokenizer.decode([token]))
    text_offset += len(tokens[-1])
  return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
          "top_logprobs": [_first_per_text(tokenizer, lp.top) for lp in logprobs],
          "text_offset": offsets}


def _first_per_text(tokenizer, top) -> dict:
  """{text: logprob} of the most likely tokens; tokens that decode alike keep the likelier."""
  out = {}
  for token, value in top:
    out.setdefault(tokenizer.decode([token]), value)
  return out


def chat_logprobs(tokenizer, token_ids, logprobs) -> dict | None:
  """The chat API's logprobs object ({"content": [...]}) for tokens `token_ids` and their
  `TokenLogprob`s (None: not asked for)."""
  if logprobs is None:
    return None

  def entry(token: int, logprob: float) -> dict:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
  return {"content": [{**entry(token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                      for token, lp in zip(token_ids, logprobs)]}


def completion_body(request_id: str, model: str, choices: list[tuple[str, str | None]],
                    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
                    logprobs: list | None = None) -> dict:
  """`choices`: (text, finish_reason) of each choice, in order; `logprobs`: each choice's
  logprobs object (`completion_logprobs`), if asked for."""
  logprobs = logprobs or [None] * len(choices)
  return {"id": request_id, "object": "text_completion", "created": int(time.time()),
          "model": model,
          "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
                      for i, ((text, finish), lp) in enumerate(zip(choices, logprobs))],
          "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def completion_chunk(request_id: str, model: str, text: str, finish_reason: str | None,
                     index: int = 0, logprobs: dict | None = None) -> dict:
  return {"id": request_id, "object": "text_completion", "created": int(time.time()),
          "model": model,
          "choices": [{"index": index, "text": text, "logprobs": logprobs,
                       "finish_reason": finish_reason}]}


def chat_body(request_id: str, model: str, choices: list[tuple[str, str | None]],
              prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
              logprobs: list | None = None) -> dict:
  """`choices`: (text, finish_reason) of each choice, in order; `logprobs`: each choice's
  logprobs object (`chat_logprobs`), if asked for."""
  logprobs = logprobs or [None] * len(choices)
  return {"id": request_id, "object": "chat.completion", "created": int(time.time()),
          "model": model,
          "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                       "logprobs": lp, "finish_reason": finish}
                      for i, ((text, finish), lp) in enumerate(zip(choices, logprobs))],
          "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None,
               index: int = 0, logprobs: dict | None = None) -> dict:
  return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
          "model": model,
          "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                       "finish_reason": finish_reason}]}
