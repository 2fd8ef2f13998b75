"""Host-side state of a request inside the engine: its tokens, its stream, its timeline."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Iterator

from disagg_jax.engine.request import RequestOutput, TokenLogprob
from disagg_jax.engine.sampling import SamplingParams


@dataclasses.dataclass
class RequestMetrics:
  """Timestamps (time.perf_counter seconds) of a request's life, for per-phase breakdowns.

  queue: arrival -> prefill_start; prefill: prefill_start -> first_token; transfer:
  transfer_start -> transfer_end (disaggregated only); decode: first_token -> finished.
  """
  arrival: float = 0.0
  prefill_start: float | None = None
  first_token: float | None = None
  transfer_start: float | None = None
  transfer_end: float | None = None
  finished: float | None = None
  token_times: list[float] = dataclasses.field(default_factory=list)
  preemptions: int = 0
  # Disaggregated: one entry per KV piece moved (engine.disagg.TransferWorker describes them).
  transfer_timeline: list[dict] = dataclasses.field(default_factory=list)
  cached_tokens: int = 0  # prompt tokens whose KV was found cached (prefix caching)

  def transfer_total(self) -> float | None:
    """Seconds from the first KV piece's copy starting to the last one landing (None when
    nothing moved); the part of it after the first token is the "transfer" phase."""
    if self.transfer_start is None or self.transfer_end is None:
      return None
    return self.transfer_end - self.transfer_start

  def transfer_bytes(self) -> int:
    return sum(int(p["bytes"]) for p in self.transfer_timeline)

  def phases(self) -> dict[str, float]:
    """Seconds spent queued, prefilling, moving KV, and decoding; they sum to the end-to-end
    latency. "transfer" runs from the first token to the KV's arrival on the decode mesh (zero
    when colocated); "decode" from there to the last token."""
    end = self.finished if self.finished is not None else self.arrival
    start = self.prefill_start if self.prefill_start is not None else end
    first = self.first_token if self.first_token is not None else end
    # KV streamed layer by layer can land before the first token is out: none exposed then.
    arrived = max(self.transfer_end, first) if self.transfer_end is not None else first
    return {"queue": start - self.arrival, "prefill": first - start,
            "transfer": arrived - first, "decode": end - arrived}


class TokenStream:
  """What `Engine.add_request` returns: iterate it for tokens as they are produced; `result()`
  waits for the finished `RequestOutput`. Async callers pass `on_token` (and use
  `add_done_callback`) instead of blocking."""

  _END = object()

  def __init__(self, request_id: str, on_token=None):
    self.request_id = request_id
    # The tokens' log-probabilities so far, when the request asked for them: entry i is token
    # i's, appended before token i is delivered.
    self.logprobs: list[TokenLogprob | None] = []
    self._on_token = on_token  # called with each token, from the engine's threads
    self._queue: queue.Queue = queue.Queue()
    self._done = threading.Event()
    self._output: RequestOutput | None = None
    self._callbacks = []
    self._lock = threading.Lock()

  def put(self, token: int, logprob: TokenLogprob | None = None) -> None:
    self.logprobs.append(logprob)
    self._queue.put(token)
    if self._on_token is not None:
      self._on_token(token)

  def finish(self, output: RequestOutput) -> None:
    with self._lock:
      self._output = output
      self._done.set()
      callbacks, self._callbacks = self._callbacks, []
    self._queue.put(self._END)
    for callback in callbacks:
      callback(output)

  def add_done_callback(self, callback) -> None:
    """Calls `callback(output)` once the request finishes (at once if it already has)."""
    with self._lock:
      if not self._done.is_set():
        self._callbacks.append(callback)
        return
    callback(self._output)

  def __iter__(self) -> Iterator[int]:
    while True:
      item = self._queue.get()
      if item is self._END:
        return
      yield item

  def result(self, timeout: float | None = None) -> RequestOutput:
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
    return self._output

  @property
  def done(self) -> bool:
    return self._done.is_set()


@dataclasses.dataclass(eq=False)
class RequestState:
  """A request as the engine tracks it. Mutated only by the engine's own threads."""
  request_id: str
  prompt_ids: list[int]
  sampling: SamplingParams
  stop_ids: frozenset[int]
  stream: TokenStream
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[TokenLogprob | None] = dataclasses.field(default_factory=list)
  metrics: RequestMetrics = dataclasses.field(default_factory=RequestMetrics)
  finish_reason: str | None = None
  error: str | None = None
  aborted: bool = False
  # Colocated chunked prefill: how many of `tokens_to_compute` are already in the page pool.
  num_computed: int = 0
  # Disaggregated: tokens of staging budget this request holds while its KV waits for a slot.
  staged: int = 0
  tokens_to_compute: list[int] = dataclasses.field(default_factory=list)
  # Prefix caching: prompt tokens found cached when first admitted (None before), and the chain
  # names of the sequence's full pages computed so far (`sched.pool.SlotPool.names`).
  cached_tokens: int | None = None
  page_names: list[bytes] = dataclasses.field(default_factory=list)

  def __post_init__(self):
    self.metrics.arrival = self.metrics.arrival or time.perf_counter()
    self.tokens_to_compute = list(self.prompt_ids)

  @property
  def arrival(self) -> float:
    """When the request arrived (the schedulers serve the oldest first, preempt the youngest)."""
    return self.metrics.arrival

  @property
  def num_to_compute(self) -> int:
    """Tokens whose KV the next prefill computes (the prompt; after a preemption, plus output)."""
    return len(self.tokens_to_compute)

  @property
  def total_len(self) -> int:
    """Tokens whose KV the sequence needs: prompt plus generated."""
    return len(self.prompt_ids) + len(self.output_ids)

  def all_tokens(self) -> list[int]:
    """The sequence so far: prompt, then generated tokens."""
    return self.prompt_ids + self.output_ids

  def emit(self, token: int, now: float, logprob: TokenLogprob | None = None) -> bool:
    """Records a generated token (and its log-probabilities, when the request asked for them);
    returns True when the request is now finished."""
    self.output_ids.append(token)
    self.logprobs.append(logprob)
    self.metrics.token_times.append(now)
    self.stream.put(token, logprob)
    if token in self.stop_ids:
      self.finish_reason = "stop"
    elif len(self.output_ids) >= self.sampling.max_new_tokens:
      self.finish_reason = "length"
    return self.finish_reason is not None

  def restart(self) -> None:
    """After preemption: recompute the KV of everything so far (prompt + generated tokens)."""
    self.metrics.preemptions += 1
    self.num_computed = 0
    self.tokens_to_compute = self.prompt_ids + self.output_ids

  def output(self, tokenizer) -> RequestOutput:
    self.metrics.cached_tokens = self.cached_tokens or 0
    return RequestOutput(self.request_id, list(self.prompt_ids), list(self.output_ids),
                         self.finish_reason, tokenizer.decode(self.output_ids) if tokenizer else "",
                         self.error, metrics=self.metrics,
                         logprobs=(list(self.logprobs) if self.sampling.logprobs is not None
                                   else None))
