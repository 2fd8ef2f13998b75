"""The serving engine: one API over the colocated and the disaggregated schedulers.

    engine = Engine.create("disagg", prefill_model, decode_model, EngineConfig(...))
    stream = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64))
    for token in stream: ...                  # tokens as they are produced
    output = stream.result()                  # RequestOutput, with per-phase timestamps
    engine.generate(prompts, sampling)        # many at once, outputs in order
    engine.abort(request_id); engine.shutdown()

The page pool is sized from device memory at start-up (`engine.memory`, printed per device). The
step shapes of sequences up to `precompile_len` tokens are compiled at start-up (lowered and
compiled, never run), longer ones on first use, each exactly once; `recompiled()` lets tests
check that. JAX's persistent compilation cache (`engine.compiled`) makes later start-ups warm.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import sys
import threading
import time
import traceback
from typing import Sequence

import jax
import numpy as np
from absl import logging

from disagg_jax.engine import buckets, compiled, memory
from disagg_jax.engine.api import EngineAPI
from disagg_jax.engine.colocated import ChunkedPrefill, ColocatedScheduler
from disagg_jax.engine.decode_core import DecodeCore
from disagg_jax.engine.disagg import DisaggDecodeLoop, StagingBudget, TransferWorker
from disagg_jax.engine.prefill_cache import (CachedPrefillWorker, decode_prefill_tokens,
                                             make_prefill_worker)
from disagg_jax.engine.request import Limits, stop_ids, validate
from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams
from disagg_jax.engine.state import RequestState, TokenStream
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.kv.pages import pages_for
from disagg_jax.kv.prefix_cache import cache_salt
from disagg_jax.models.config import ModelConfig
from disagg_jax.models.loading import Model
from disagg_jax.transfer.pieces import parse_transfer
from disagg_jax.transfer.plan import TransferPlan

MODES = ("colocated", "disagg")
COMPILE_THREADS = min(4, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Serving knobs (configs/engine.py holds the defaults and documents them)."""
  page_size: int = 16
  max_seq_len: int = 0  # 0: the model's limit
  max_prefill_length: int = 0  # 0: max_seq_len
  decode_batch: int = 32  # decode slots
  memory_fraction: float = 0.0  # share of free device memory for KV; 0: 0.9 (TPU/GPU), 0.05 (CPU)
  num_pages: int = 0  # page pool incl. one scratch page per dp shard; 0: sized from memory
  prefill_batch: int = 4  # disagg: prompts per prefill step
  max_prefill_tokens: int = 8192  # disagg: padded prompt tokens per prefill step (>= one prompt)
  chunk_size: int = 128  # colocated: prompt tokens per chunk
  chunk_batch: int = 4  # colocated: chunks per step
  precompile_len: int = 128  # shapes up to this many tokens compile at start-up; -1: all
  attention_impl: str = "auto"
  transfer: str = "request"  # disagg: request | layers:N (transfer.pieces)
  transfers_in_flight: int = 4  # disagg: KV pieces being copied at once
  # disagg: tokens of prefilled KV that may wait on the decode devices for a slot; -1: one full
  # prefill step's worth, at least the longest length bucket (buckets.staging_tokens).
  staging_tokens: int = -1
  # The decode loops dispatch step N+1 before reading step N's tokens (the device never waits
  # for the host); false: each step's tokens are read before the next step is decided, as a
  # synchronous scheduler (vLLM's before v0.10) does.
  run_ahead: bool = True
  prefix_caching: bool = True  # reuse the KV of full pages already computed (kv.prefix_cache)
  # disagg, with prefix_caching: the longest uncached tail the decode mesh prefills itself for a
  # prompt whose prefix its pool holds; -1: chunk_size on TPU/GPU, 0 (off) on CPU.
  decode_prefill_tokens: int = -1
  # disagg, with prefix_caching: tokens of KV the prefill mesh keeps in a page pool of its own
  # and computes only the uncached tails against (engine.prefill_cache); 0: off (one dense step
  # per batch); -1: max_prefill_tokens, and at least max_seq_len per dp row
  # (memory.prefill_cache_tokens).
  prefill_cache_tokens: int = -1
  # --cluster=ray: how a request's prefill worker is chosen (sched.routing): prefix | load |
  # round_robin.
  routing: str = "prefix"

  def precompile_tokens(self, max_seq_len: int) -> int:
    """Sequences up to this many tokens have their step shapes compiled at start-up."""
    return max_seq_len if self.precompile_len < 0 else min(self.precompile_len, max_seq_len)

  @classmethod
  def from_config(cls, engine_config, **overrides) -> "EngineConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(engine_config).items() if k in fields}
    values.update(overrides)
    return cls(**values)


class Engine(EngineAPI):
  """Use `Engine.create`; the constructor expects already-placed models. The serving API is
  `engine.api.EngineAPI`; the step hooks below are for profilers."""

  def __init__(self, mode: str, prefill_model: Model, decode_model: Model, config: EngineConfig,
               progress: bool = True):
    if mode not in MODES:
      raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    self.mode = mode
    self.config = config
    self.model = decode_model
    self.tokenizer = decode_model.tokenizer
    self.progress = progress
    cfg = decode_model.cfg
    ps = config.page_size
    self.limits = Limits.for_model(cfg, config.max_seq_len, config.max_prefill_length)
    self.decode_steps = ModelSteps(decode_model, page_size=ps,
                                   attention_impl=config.attention_impl)
    self.length_buckets = buckets.length_buckets(self.limits.max_seq_len, ps)
    if mode == "disagg":
      self.prefill_steps = ModelSteps(prefill_model, page_size=ps,
                                      attention_impl=config.attention_impl)
    self.pool = self._plan_pool(prefill_model, decode_model)
    for line in self._describe_pool(prefill_model):
      self._say(line)
    self.page_capacity = self.pool.usable_pages
    self.decode_prefill_tokens = (
        decode_prefill_tokens(config, decode_model.mesh) if mode == "disagg" else 0)
    self.core = DecodeCore(self.decode_steps, num_slots=config.decode_batch,
                           pages_per_shard=self.pool.pages_per_shard,
                           max_seq_len=self.limits.max_seq_len,
                           prefix_caching=config.prefix_caching and (
                               mode == "colocated" or self.decode_prefill_tokens > 0),
                           salt=cache_salt(cfg))
    self.core.params = decode_model.params
    self._requests: dict[str, RequestState] = {}
    self._lock = threading.Lock()
    self._ids = itertools.count()
    self._error: str | None = None
    self._threads: list[threading.Thread] = []

    if mode == "colocated":
      self.scheduler = ColocatedScheduler(self.core, chunk_size=config.chunk_size,
                                          chunk_batch=config.chunk_batch, finish=self._finish,
                                          run_ahead=config.run_ahead)
      self._workers = [self.scheduler]
      self._submit = self.scheduler.put
      shapes = self.scheduler.shapes(self._precompile_len() // ps)
    else:
      per_group = parse_transfer(config.transfer, cfg.num_layers)
      if config.transfers_in_flight < 1:
        raise ValueError(f"--config.engine.transfers_in_flight={config.transfers_in_flight} "
                         "must be >= 1")
      self.staging = StagingBudget(self.pool.staging_tokens)
      # With prefix caching, cache hits with a short tail are prefilled on the decode mesh.
      chunks = (ChunkedPrefill(self.core, chunk_size=config.chunk_size,
                               chunk_batch=config.chunk_batch,
                               max_tail=self.decode_prefill_tokens)
                if self.core.slots.prefix_caching else None)
      self.decode_loop = DisaggDecodeLoop(self.core, length_buckets=self.length_buckets,
                                          finish=self._finish, requeue=self._requeue,
                                          staging=self.staging, layers_per_group=per_group,
                                          chunks=chunks, run_ahead=config.run_ahead)
      self.plan = TransferPlan(cfg, prefill_model.mesh, decode_model.mesh)
      self.transfer = TransferWorker(self.plan, self.decode_loop.deliver, self._finish,
                                     self.staging, max_in_flight=config.transfers_in_flight)
      self.prefill = make_prefill_worker(
          config, self.limits, self.prefill_steps, prefill_model.params, self.plan,
          handoff=self.transfer.submit, discard=self.transfer.discard, finish=self._finish,
          staging=self.staging, layers_per_group=per_group, say=self._say)
      self._workers = [self.prefill, self.transfer, self.transfer.landing, self.decode_loop]
      self._submit = self._submit_disagg
      shapes = (self.prefill.shapes(self._precompile_len())
                + self.decode_loop.shapes(self._precompile_len(), self._piece_spec))
    self._compile_ahead(shapes)
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
    need = pages_for(len(prompt) + sampling.max_new_tokens, self.config.page_size)
    if need > self.pool.usable_pages_per_shard:
      raise InvalidRequestError(
          f"prompt + max_new_tokens needs {need} pages of {self.config.page_size} tokens; the "
          f"page pool holds {self.pool.usable_pages_per_shard} per dp shard "
          "(--config.engine.memory_fraction, --config.engine.num_pages)")
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

  @property
  def error(self) -> str | None:
    """Why the engine stopped, if a worker crashed; None while healthy."""
    return self._error

  @property
  def model_cfg(self) -> ModelConfig:
    return self.model.cfg

  @property
  def num_devices(self) -> int:
    size = self.decode_steps.mesh.size
    return size + self.prefill_steps.mesh.size if self.mode == "disagg" else size

  def stats(self) -> dict:
    """Queue lengths and page use, for monitoring."""
    slots = self.core.slots
    out = {"mode": self.mode, "in_flight": len(self._requests),
           "running": len(slots.occupied()), "free_pages": slots.num_free,
           "total_pages": self.page_capacity,
           "cached_pages": sum(a.num_cached for a in slots.allocators)}
    if self.mode == "disagg" and isinstance(self.prefill, CachedPrefillWorker):
      out["prefill_cached_pages"] = sum(a.num_cached for a in self.prefill.slots.allocators)
    if self.mode == "colocated":
      out["waiting"] = len(self.scheduler.queue)
    else:
      out.update(waiting=self.prefill.waiting() + len(self.decode_loop.local),
                 transferring=self.transfer.queue.qsize() + self.transfer.landing.queue.qsize(),
                 awaiting_slot=len(self.decode_loop.queue))
    return out

  def load(self) -> dict:
    """Disagg: the work done so far and what waits, for the elastic controller's signals
    (`engine.elastic`): prompt tokens computed and seconds busy on the prefill mesh; decode
    steps, their rows and seconds (with the sums a least-squares fit of step time against rows
    needs); prompt tokens queued for prefill; decode slots."""
    return {"prefill_tokens": self.prefill.tokens_done, "prefill_busy_s": self.prefill.busy_s,
            "decode_tokens": self.decode_loop.tokens_done,
            "decode_busy_s": self.decode_loop.busy_s,
            "decode_steps": self.decode_loop.steps_done,
            "decode_rows_sq": self.decode_loop.tokens_sq,
            "decode_rows_busy": self.decode_loop.tokens_busy,
            "queued_prefill_tokens": sum(r.num_to_compute for r in self.prefill.pending()),
            "decode_slots": self.core.slots.num_slots}

  def detach(self) -> tuple[list[RequestState], int]:
    """Stops this engine's threads without ending its requests and hands them over (oldest
    first) for another engine to `adopt`: (requests, tokens whose KV is lost and must be
    computed again). A request holding KV (prefilled, partly chunked, or decoding) restarts from
    its prompt and the tokens it generated (`RequestState.restart`, counted as a preemption); one
    still waiting keeps its place. The engine is unusable afterwards."""
    for worker in self._workers:
      worker.stop()
    for thread in self._threads:
      thread.join()
    with self._lock:
      states = sorted(self._requests.values(), key=lambda r: r.arrival)
      self._requests.clear()
      self._error = "detached (its requests moved to another engine)"
    lost = 0
    for state in states:
      state.staged = 0  # the staging reservations went with this engine
      if state.num_computed == 0 and state.tokens_to_compute == state.all_tokens():
        continue  # waiting for prefill, nothing computed yet
      # Its KV (all but the last token once it generated some) stays behind.
      lost += state.total_len - 1 if state.output_ids else state.num_computed
      if state.output_ids:
        state.restart()
      state.num_computed = 0
    return states, lost

  def adopt(self, states: Sequence[RequestState]) -> None:
    """Takes over requests another engine `detach`ed, in order, as if they had just arrived
    (their streams, outputs and timestamps carry on)."""
    with self._lock:
      for state in states:
        self._requests[state.request_id] = state
    for state in states:
      self._submit(state)

  def steps(self) -> list:
    """Every compiled step function (`engine.compiled.Step`) of this engine."""
    out = self.decode_steps.all_steps()
    if self.mode == "disagg":
      out += self.prefill_steps.all_steps() + [self.prefill.extract]
    return out

  def recompiled(self) -> dict[str, int]:
    """Step functions that compiled some shape more than once: {name: extra compilations}.
    Empty when healthy (shapes compiled on first use are expected, not recompilations)."""
    return {f"{i}.{step.name}": step.unexpected_compiles()
            for i, step in enumerate(self.steps()) if step.unexpected_compiles()}

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

  # ------------------------------------------------------------------ step hooks
  # For profilers (`disagg_jax.sim.timing`), not for serving: each dispatches one of this
  # engine's own compiled steps on placeholder inputs, so what is timed is exactly the code that
  # serves. Call them only while no request is in flight.

  def wait_decode(self) -> None:
    """Blocks until every step dispatched on the decode (colocated: the only) mesh has run."""
    jax.block_until_ready((self.core.tokens, self.core.kv_pages))

  def decode_step_shapes(self) -> list[tuple[int, int]]:
    """(rows over all dp rows, page-table width in pages) of every decode step shape."""
    dp = self.core.steps.dp
    return [(rows * dp, w) for rows in self.core.row_buckets for w in self.core.widths]

  def mixed_step_shapes(self) -> list[tuple[int, int, int]]:
    """Colocated: (chunk rows over all dp rows, chunk length, page-table width in pages) of
    every mixed step shape."""
    chunks = self.scheduler.chunks
    return [(rows * chunks.dp, c, w) for rows in chunks.rows_per_shard
            for c in chunks.chunk_lens for w in chunks.widths]

  def run_mixed_step(self, chunk_rows: int, chunk_len: int, width: int | None = None) -> None:
    """Colocated: dispatches a mixed step of `chunk_rows` x `chunk_len` chunks over a
    `width`-page table (one of `mixed_step_shapes`; default the widest, contexts up to
    max_seq_len), with no chunk or decode row live: every write is dropped."""
    self.scheduler.run_mixed_discarded(chunk_rows // self.scheduler.chunks.dp, chunk_len,
                                       width or self.core.widths[-1])

  def prefill_step_shapes(self) -> list[tuple[int, int]]:
    """Disagg: (batch, length) of every prefill step shape, length bucket by length bucket."""
    if isinstance(self.prefill, CachedPrefillWorker):
      raise ValueError("the step-time table times dense prefill steps; the prefill mesh runs "
                       "chunks into its cache: profile with "
                       "--config.engine.prefill_cache_tokens=0")
    return [(b, s) for s in self.length_buckets for b in self.prefill.batch_buckets_for(s)]

  def run_prefill_step(self, batch: int, length: int) -> list:
    """Disagg: runs a prefill step of `batch` one-token prompts padded to `length` tokens
    (one of `prefill_step_shapes`) and returns its KV, one list of layers per layer group
    (`--config.engine.transfer`), on the prefill mesh."""
    groups = []
    self.prefill.prefill_batch(np.zeros((batch, length), np.int32), np.ones(batch, np.int32),
                               [], on_group=lambda g, kv: groups.append(kv))
    return groups

  def extract_kv(self, groups: list) -> list:
    """Disagg: the first request's KV of `run_prefill_step`'s, all its pages of every layer
    group, as the pieces the transfer moves."""
    length = groups[0][0].k.shape[1]
    pages = pages_for(length, self.config.page_size)
    return [piece for g, kv in enumerate(groups) for piece in self.prefill.pieces(kv, 0, pages, g)]

  def transfer_kv(self, pieces):
    """Disagg: `extract_kv`'s pieces copied onto the decode mesh."""
    return [dataclasses.replace(piece, arrays=self.plan.transfer(piece.arrays))
            for piece in pieces]

  def run_insert_step(self, moved) -> None:
    """Disagg: dispatches the inserts of `transfer_kv`'s pieces into the decode pool, every
    page write dropped."""
    self.decode_loop.insert_discarded(moved)

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

  def _submit_disagg(self, state: RequestState) -> None:
    """To the decode loop if it holds a prefix of the prompt (`DisaggDecodeLoop.route`), else
    to prefill."""
    if not self.decode_loop.route(state):
      self.prefill.put(state)

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

  def _say(self, line: str) -> None:
    """Start-up information: printed (stderr) when the engine shows progress, else logged."""
    if self.progress:
      print(line, file=sys.stderr, flush=True)
    else:
      logging.info(line)

  def _precompile_len(self) -> int:
    return self.config.precompile_tokens(self.limits.max_seq_len)

  def _plan_pool(self, prefill_model: Model, decode_model: Model) -> memory.PoolPlan:
    """Sizes the decode (or colocated) mesh's page pool; see `engine.memory`."""
    try:
      return memory.plan_engine_pool(
          self.config, self.limits, self.mode, decode_model,
          prefill_model if self.mode == "disagg" else None)
    except memory.PoolSizeError as e:
      raise ValueError(str(e)) from None

  def _describe_pool(self, prefill_model: Model) -> list[str]:
    lines = []
    if self.mode == "disagg":
      lines.append(memory.describe_prefill(self.config, self.limits, prefill_model))
    name = "decode" if self.mode == "disagg" else "colocated"
    return lines + self.pool.describe(name, self.model.mesh)

  def _piece_spec(self, layers: int, pages: int) -> jax.ShapeDtypeStruct:
    """A KV piece of `layers` layers and `pages` pages as it arrives on the decode mesh."""
    return jax.ShapeDtypeStruct(self.plan.layout.shape(pages * self.config.page_size, layers),
                                self.model.dtype, sharding=self.plan.decode_sharding)

  def _compile_ahead(self, shapes) -> None:
    """Compiles (without running) the step shapes of sequences up to precompile_len tokens."""
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    compiled.CacheStats.install()
    hits, misses = compiled.CacheStats.snapshot()
    start = time.perf_counter()
    # Tracing holds the GIL but XLA's compiler (and the cache's deserialisation) does not: a few
    # threads overlap them.
    with concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS) as pool:
      futures = [pool.submit(thunk) for _, thunk in shapes]
      for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures),
                         desc=f"compiling {self.mode} steps", disable=not self.progress,
                         leave=False):
        future.result()
    seconds = time.perf_counter() - start
    hits2, misses2 = compiled.CacheStats.snapshot()
    cached = f", {hits2 - hits} from the persistent cache" if hits2 - hits else ""
    longer = ("" if self._precompile_len() >= self.limits.max_seq_len else
              f"; longer ones compile on first use (--config.engine.precompile_len="
              f"{self.config.precompile_len})")
    self._say(f"compiled {len(shapes)} step shapes for sequences up to "
              f"{self._precompile_len()} tokens in {seconds:.1f} s{cached}{longer}")
