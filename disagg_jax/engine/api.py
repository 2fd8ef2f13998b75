"""What the launch scripts, the HTTP server and the benchmark runner may use of an engine.

Two engines serve requests: the in-process `engine.engine.Engine` (`--mode=colocated|disagg`)
and the Ray-backed `cluster.driver.ClusterEngine` (`--cluster=ray`). Both subclass `EngineAPI`, so
`cli.build_engine` returns one type whichever it built, and `tests/test_imports.py` checks that
each implements every member with the protocol's signature. Anything else on either class (the
in-process engine's step hooks for `sim.timing`, the cluster's workers) is not part of the API.

`Generator` is the smaller contract of offline generation (`launch/generate.py`), which the
static-batch reference `engine.single.StaticGenerator` (`--mode=single`) also meets.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

from disagg_jax.engine.request import Limits, RequestOutput
from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams
from disagg_jax.engine.state import TokenStream
from disagg_jax.models.config import ModelConfig
from disagg_jax.models.tokenizer import Tokenizer


@runtime_checkable
class Generator(Protocol):
  """Offline generation: prompts in, one output per prompt out, in order."""

  tokenizer: Tokenizer

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams]) -> list[RequestOutput]:
    """One output per prompt, in order; a prompt that cannot be served gets an output with
    finish_reason "error" and `error` set, and the others are generated."""
    ...

  def shutdown(self) -> None:
    """Stops whatever runs in the background; requests in flight end with "abort"."""
    ...


@runtime_checkable
class EngineAPI(Generator, Protocol):
  """A serving engine: requests stream their tokens while others arrive and finish.

  Subclasses set the attributes and implement `add_request`, `abort`, `stats` and `shutdown`;
  `generate` and the context manager come with the protocol.
  """

  mode: str  # "colocated" | "disagg"
  limits: Limits  # the longest sequence and prompt a request may have
  model_cfg: ModelConfig  # the served model (vocabulary, stop ids, shapes)
  num_devices: int  # devices serving, over every mesh / worker
  error: str | None  # why the engine stopped (a crashed worker); None while healthy

  def add_request(self, prompt_token_ids: Sequence[int], sampling: SamplingParams | None = None,
                  request_id: str | None = None,
                  on_token: Callable[[int], None] | None = None) -> TokenStream:
    """Queues a request; raises InvalidRequestError (naming the value and the limit) if it
    cannot be served. Iterate the returned stream for its tokens, or pass `on_token` to be
    called with each (from an engine thread)."""
    ...

  def abort(self, request_id: str) -> bool:
    """Stops a request wherever it is; its stream ends with finish_reason "abort". False if no
    such request is in flight."""
    ...

  def stats(self) -> dict:
    """Queue lengths and page use, for monitoring (`serve.metrics`): at least "mode",
    "in_flight", "waiting", "free_pages" and "total_pages"."""
    ...

  def health(self) -> tuple[str, str | None]:
    """("ok" | "degraded" | "unavailable", why): unavailable, new requests cannot be served;
    degraded, they are, with less capacity than configured."""
    if self.error:
      return "unavailable", self.error
    return "ok", None

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams]) -> list[RequestOutput]:
    """All prompts at once through `add_request`; outputs in order. Invalid prompts get an
    error output."""
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    streams: list[TokenStream | RequestOutput] = []
    for i, (prompt, params) in enumerate(zip(prompts, sampling)):
      try:
        streams.append(self.add_request(prompt, params))
      except InvalidRequestError as e:
        streams.append(RequestOutput(f"invalid-{i}", list(prompt), finish_reason="error",
                                     error=str(e)))
    return [s if isinstance(s, RequestOutput) else s.result() for s in streams]

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.shutdown()
