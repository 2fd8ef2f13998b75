"""The serving engine: one API over the colocated and the disaggregated schedulers.

    engine = Engine.create("disagg", prefill_model, decode_model, EngineConfig(...))
    stream = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64))
    for token in stream: ...                  # tokens as they are produced
    output = stream.result()                  # RequestOutput, with per-phase timestamps
    engine.generate(prompts, sampling)        # many at once, outputs in order
    engine.abort(request_id); engine.shutdown()

Every shape the schedulers use is compiled at start-up (with a progress bar) and never again while
serving; `compile_counts()` exposes the jit caches so tests can check that.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import traceback
from typing import Sequence

import jax
import jax.numpy as jnp
from absl import logging

from disagg_jax.engine import buckets
from disagg_jax.engine.colocated import ColocatedScheduler
from disagg_jax.engine.decode_core import DecodeCore
from disagg_jax.engine.disagg import DisaggDecodeLoop, PrefillWorker, TransferWorker
from disagg_jax.engine.request import Limits, RequestOutput, stop_ids, validate
from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams
from disagg_jax.engine.state import RequestState, TokenStream
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.models.loading import Model
from disagg_jax.transfer.plan import TransferPlan

MODES = ("colocated", "disagg")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Serving knobs (configs/engine.py holds the defaults)."""
  page_size: int = 16
  max_seq_len: int = 0  # 0: the model's limit
  max_prefill_length: int = 0  # 0: max_seq_len
  decode_batch: int = 32  # decode slots
  num_pages: int = 0  # page pool size incl. one scratch page; 0: enough for every slot at full length
  prefill_batch: int = 4  # disagg: prompts per prefill step
  chunk_size: int = 128  # colocated: prompt tokens per chunk
  chunk_batch: int = 4  # colocated: chunks per step
  attention_impl: str = "auto"

  @classmethod
  def from_config(cls, engine_config, **overrides) -> "EngineConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(engine_config).items() if k in fields}
    values.update(overrides)
    return cls(**values)


class Engine:
  """Use `Engine.create`; the constructor expects already-placed models."""

  def __init__(self, mode: str, prefill_model: Model, decode_model: Model, config: EngineConfig,
               progress: bool = True):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    self.mode = mode
    self.config = config
    self.model = decode_model
    self.tokenizer = decode_model.tokenizer
    cfg = decode_model.cfg
    ps = config.page_size
    self.limits = Limits.for_model(cfg, config.max_seq_len, config.max_prefill_length)
    pages_per_seq = -(-self.limits.max_seq_len // ps)
    num_pages = config.num_pages or config.decode_batch * pages_per_seq + 1
    if num_pages - 1 < pages_per_seq:
      raise ValueError(
          f"num_pages={num_pages} holds {num_pages - 1} usable pages of {ps} tokens, fewer than "
          f"one max_seq_len={self.limits.max_seq_len} sequence needs ({pages_per_seq})")
    self.page_capacity = num_pages - 1

    self.decode_steps = ModelSteps(decode_model, page_size=ps,
                                   attention_impl=config.attention_impl)
    self.core = DecodeCore(self.decode_steps, num_slots=config.decode_batch, num_pages=num_pages,
                           pages_per_seq=pages_per_seq)
    self.core.params = decode_model.params
    self._requests: dict[str, RequestState] = {}
    self._lock = threading.Lock()
    self._ids = itertools.count()
    self._error: str | None = None
    self._threads: list[threading.Thread] = []

    if mode == "colocated":
      self.scheduler = ColocatedScheduler(self.core, chunk_size=config.chunk_size,
                                          chunk_batch=config.chunk_batch, finish=self._finish)
      self._workers = [self.scheduler]
      self._submit = self.scheduler.put
      warmups = self.scheduler.warmup_steps()
    else:
      self.prefill_steps = ModelSteps(prefill_model, page_size=ps,
                                      attention_impl=config.attention_impl)
      length_buckets = buckets.length_buckets(self.limits.max_seq_len, ps)
      backlog = threading.Semaphore(config.decode_batch)
      self.decode_loop = DisaggDecodeLoop(self.core, length_buckets=length_buckets,
                                          finish=self._finish, requeue=self._requeue,
                                          backlog=backlog)
      self.plan = TransferPlan(cfg, prefill_model.mesh, decode_model.mesh)
      self.transfer = TransferWorker(self.plan, self.decode_loop.deliver, self._finish, backlog)
      self.prefill = PrefillWorker(self.prefill_steps, prefill_model.params, self.plan,
                                   length_buckets=length_buckets,
                                   max_batch=config.prefill_batch, handoff=self.transfer.submit,
                                   finish=self._finish, backlog=backlog)
      self._workers = [self.prefill, self.transfer, self.decode_loop]
      self._submit = self.prefill.put
      warmups = (self.prefill.warmup_steps()
                 + self.decode_loop.warmup_steps(self._dummy_prefix))
    self._compile_ahead(warmups, progress)
    self._compiled = self.compile_counts()
    for worker in self._workers:
      thread = threading.Thread(target=self._guard, args=(worker,), daemon=True,
                                name=f"disagg_jax-{type(worker).__name__}")
      thread.start()
      self._threads.append(thread)

  @classmethod
  def create(cls, mode: str, prefill_model: Model, decode_model: Model | None = None,
             config: EngineConfig | None = None, progress: bool = True) -> "Engine":
    """`decode_model` is the decode mesh's copy (disagg); colocated uses `prefill_model` alone."""
    if mode == "disagg":
      if decode_model is None:
        raise ValueError("mode='disagg' needs a decode_model on the decode mesh")
      shared = set(prefill_model.mesh.devices.flat) & set(decode_model.mesh.devices.flat)
      if shared:
        raise ValueError(f"prefill and decode meshes share devices {sorted(d.id for d in shared)}")
    return cls(mode, prefill_model, decode_model or prefill_model, config or EngineConfig(),
               progress)

  # ------------------------------------------------------------------ public API

  def add_request(self, prompt_token_ids: Sequence[int], sampling: SamplingParams | None = None,
                  request_id: str | None = None, on_token=None) -> TokenStream:
    """Queues a request; raises InvalidRequestError (naming the value and the limit) if it
    cannot be served. Iterate the returned stream for its tokens, or pass `on_token` to be
    called with each (from an engine thread)."""
    if self._error:
      raise RuntimeError(f"the engine has stopped: {self._error}")
    sampling = sampling or SamplingParams()
    prompt = list(prompt_token_ids)
    validate(prompt, sampling, self.model.cfg, self.limits)
    need = -(-(len(prompt) + sampling.max_new_tokens) // self.config.page_size)
    if need > self.page_capacity:
      raise InvalidRequestError(
          f"prompt + max_new_tokens needs {need} pages of {self.config.page_size} tokens; the "
          f"page pool holds {self.page_capacity} (--config.engine.num_pages)")
    request_id = request_id or f"req-{next(self._ids)}"
    stream = TokenStream(request_id, on_token)
    state = RequestState(request_id, prompt, sampling, stop_ids(sampling, self.model.cfg), stream)
    with self._lock:
      if request_id in self._requests:
        raise InvalidRequestError(f"request_id {request_id!r} is already in use")
      self._requests[request_id] = state
    self._submit(state)
    return stream

  def abort(self, request_id: str) -> bool:
    """Stops a request wherever it is; its stream ends with finish_reason "abort" and its slot
    and pages are freed. False if no such request is in flight."""
    with self._lock:
      state = self._requests.get(request_id)
    if state is None:
      return False
    state.aborted = True
    for worker in self._workers:
      worker.wake()
    return True

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams]) -> list[RequestOutput]:
    """All prompts at once; outputs in order. Invalid prompts get an error output."""
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

  @property
  def error(self) -> str | None:
    """Why the engine stopped, if a worker crashed; None while healthy."""
    return self._error

  @property
  def num_devices(self) -> int:
    size = self.decode_steps.mesh.size
    return size + self.prefill_steps.mesh.size if self.mode == "disagg" else size

  def stats(self) -> dict:
    """Queue lengths and page use, for monitoring."""
    slots = self.core.slots
    out = {"mode": self.mode, "in_flight": len(self._requests),
           "running": len(slots.occupied()), "free_pages": slots.allocator.num_free,
           "total_pages": self.page_capacity}
    if self.mode == "colocated":
      out["waiting"] = len(self.scheduler.queue)
    else:
      out.update(waiting=len(self.prefill.queue), transferring=self.transfer.queue.qsize(),
                 awaiting_slot=len(self.decode_loop.queue))
    return out

  def compile_counts(self) -> dict[str, int]:
    """Entries in each step function's jit cache (constant after start-up)."""
    steps = [self.decode_steps] + ([self.prefill_steps] if self.mode == "disagg" else [])
    counts = {}
    for i, s in enumerate(steps):
      for name in ("prefill", "insert_prefix", "decode", "mixed"):
        counts[f"{i}.{name}"] = getattr(s, name)._cache_size()
    if self.mode == "disagg":
      counts["extract"] = self.prefill.extract._cache_size()
    return counts

  def recompiled(self) -> dict[str, tuple[int, int]]:
    """Step functions compiled again since start-up: {name: (at start-up, now)}."""
    now = self.compile_counts()
    return {k: (self._compiled[k], v) for k, v in now.items() if v != self._compiled[k]}

  def shutdown(self) -> None:
    with self._lock:
      pending = list(self._requests.values())
    for state in pending:
      state.aborted = True
    for worker in self._workers:
      worker.stop()
    for thread in self._threads:
      thread.join(timeout=30)
    for state in pending:
      self._finish(state)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.shutdown()

  # ------------------------------------------------------------------ internals

  def _finish(self, state: RequestState) -> None:
    with self._lock:
      if state.stream.done:
        return
      self._requests.pop(state.request_id, None)
    if state.finish_reason is None:
      state.finish_reason = "abort" if state.aborted else "error"
    state.metrics.finished = time.perf_counter()
    state.stream.finish(state.output(self.tokenizer))

  def _requeue(self, state: RequestState) -> None:
    self.prefill.put(state, front=True)

  def _guard(self, worker) -> None:
    """A crashed worker fails every request in flight instead of leaving callers hanging."""
    try:
      worker.run()
    except Exception as e:  # pylint: disable=broad-except
      self._error = f"{type(worker).__name__} crashed: {type(e).__name__}: {e}"
      logging.error("%s\n%s", self._error, traceback.format_exc())
      with self._lock:
        pending = list(self._requests.values())
      for state in pending:
        state.error = self._error
        self._finish(state)
      for other in self._workers:
        other.stop()

  def _dummy_prefix(self, bucket: int):
    """Zeros shaped like a `bucket`-token request's KV as it arrives on the decode mesh."""
    shape = self.plan.layout.shape(bucket)
    return jax.jit(lambda: jnp.zeros(shape, self.model.dtype),
                   out_shardings=self.plan.decode_sharding)()

  def _compile_ahead(self, warmups, progress: bool) -> None:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    for _, thunk in tqdm(warmups, desc=f"compiling {self.mode} steps", disable=not progress,
                         leave=False):
      thunk()
    jax.block_until_ready(self.core.kv_pages)
    logging.info("compiled %d step shapes in %.1f s", len(warmups), time.perf_counter() - start)
