"""Prefill and decode workers that run in their own processes (Ray actors), each owning a mesh
over its local devices and reusing the engine's step functions and schedulers unchanged.

KV moves directly between workers with `jax.experimental.transfer`: a prefill worker offers each
request's KV blocks (`await_pull`), the decode worker pulls them onto its devices. Only small
control messages (ids, token lists, timestamps) go through Ray. Timestamps are wall-clock
(`time.time()`), comparable across processes on one host; the driver converts them.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
  """Everything a worker process needs to build its mesh, model and scheduler."""
  worker_id: str
  model_path: str | None
  dtype: str
  num_devices: int
  tp: int
  engine: dict  # EngineConfig fields
  decode_blocks: int  # KV-head blocks of the decode meshes (prefill packs for that layout)
  cpu_cores: tuple[int, ...] = ()  # pin the process (and its XLA threads) to these cores
  host: str = "127.0.0.1"
  kv_lease_s: float = 30.0  # offered KV not pulled by then is dropped (prefill)
  pull_timeout_s: float = 30.0  # a pull that does not complete by then fails (decode)
  compilation_cache_dir: str | None = None  # JAX's persistent cache ("none": off)


def _pin_process(cores) -> None:
  """Pins every thread of this process (Ray started several before us) and so everything they
  start later. A thread left on another core would hold the GIL while that core is busy."""
  for tid in os.listdir("/proc/self/task"):
    try:
      os.sched_setaffinity(int(tid), set(cores))
    except OSError:  # the thread exited meanwhile
      pass


def _setup_process(spec: WorkerSpec):
  """Before JAX starts: pin cores, simulate devices on CPU, keep logs quiet."""
  if spec.cpu_cores:
    _pin_process(spec.cpu_cores)
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine import compiled  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  jax.config.update("jax_num_cpu_devices", spec.num_devices)
  compiled.enable_persistent_cache(spec.compilation_cache_dir)
  return jax


def _build(spec: WorkerSpec):
  jax = _setup_process(spec)
  from disagg_jax import parallel  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.engine import EngineConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.request import Limits  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.steps import ModelSteps  # pylint: disable=g-import-not-at-top
  from disagg_jax.models import loading  # pylint: disable=g-import-not-at-top
  import jax.experimental.transfer as jax_transfer  # pylint: disable=g-import-not-at-top
  devices = jax.devices()[:spec.num_devices]
  mesh = parallel.make_mesh(devices, spec.tp)
  model = loading.load_model(spec.model_path, mesh, spec.dtype)
  config = EngineConfig(**spec.engine)
  limits = Limits.for_model(model.cfg, config.max_seq_len, config.max_prefill_length)
  steps = ModelSteps(model, page_size=config.page_size, attention_impl=config.attention_impl)
  server = jax_transfer.start_transfer_server(devices[0].client, f"{spec.host}:0",
                                              [f"{spec.host}:0"] * 2)
  return model, config, limits, steps, server


class _Outbox:
  """Events for the driver, taken in batches by `poll`."""

  def __init__(self):
    self._items = []
    self._lock = threading.Lock()

  def add(self, item: dict) -> None:
    with self._lock:
      self._items.append(item)

  def take(self) -> list[dict]:
    with self._lock:
      items, self._items = self._items, []
    return items


class _TokenSink:
  """Stands in for a TokenStream inside a worker: tokens go to the driver via the outbox."""

  def __init__(self, request_id: str, outbox: _Outbox):
    self.request_id, self.outbox = request_id, outbox

  def put(self, token: int, logprob=None) -> None:
    self.outbox.add({"kind": "token", "request_id": self.request_id, "token": int(token),
                     "logprob": logprob and logprob.to_json(), "time": time.time()})


def _state(item: dict, outbox: _Outbox):
  """A RequestState rebuilt from the driver's description of the request."""
  from disagg_jax.engine.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.state import RequestMetrics, RequestState  # pylint: disable=g-import-not-at-top
  state = RequestState(item["request_id"], list(item["prompt_ids"]),
                       SamplingParams(**item["sampling"]), frozenset(item["stop_ids"]),
                       _TokenSink(item["request_id"], outbox),
                       metrics=RequestMetrics(arrival=item.get("arrival", time.time())))
  state.output_ids = list(item.get("output_ids", ()))
  state.logprobs = [None] * len(state.output_ids)  # the driver has them already
  # For prefill: everything so far; for decode: the `computed` tokens whose KV arrives.
  state.tokens_to_compute = (list(item["prompt_ids"]) + state.output_ids)[:item.get("computed")]
  return state


class PrefillServer:
  """A prefill worker: length-bucketed prefill batches; each request's KV offered for pulling."""

  def __init__(self, spec: WorkerSpec):
    import jax  # pylint: disable=g-import-not-at-top
    model, config, limits, steps, server = _build(spec)
    from disagg_jax.engine.disagg import StagingBudget  # pylint: disable=g-import-not-at-top
    from disagg_jax.engine.prefill_cache import CachedPrefillWorker, make_prefill_worker  # pylint: disable=g-import-not-at-top
    from disagg_jax.transfer.pieces import parse_transfer  # pylint: disable=g-import-not-at-top
    from disagg_jax.transfer.plan import TransferPlan  # pylint: disable=g-import-not-at-top
    self.spec, self.jax, self.server = spec, jax, server
    self.plan = TransferPlan(model.cfg, model.mesh, decode_blocks=spec.decode_blocks)
    self.outbox = _Outbox()
    self.offers: dict[int, tuple[float, list]] = {}  # uuid -> (time offered, blocks)
    self._parts: dict[str, list[dict]] = {}  # request id -> its pieces offered so far
    self._uuids = itertools.count(1)
    self._lock = threading.Lock()
    # Offers wait on this worker until pulled or expired (the lease), not on decode devices.
    # With --config.engine.prefill_cache_tokens, prompts are computed into a caching pool.
    self.worker = make_prefill_worker(
        config, limits, steps, model.params, self.plan, handoff=self._offer,
        discard=self._discard, finish=self._finished, staging=StagingBudget(2**62),
        layers_per_group=parse_transfer(config.transfer, model.cfg.num_layers))
    self.cache_pages = (self.worker.slots.capacity
                        if isinstance(self.worker, CachedPrefillWorker) else 0)
    for _, thunk in self.worker.shapes(config.precompile_tokens(limits.max_seq_len)):
      thunk()
    threading.Thread(target=self.worker.run, daemon=True).start()
    threading.Thread(target=self._expire_loop, daemon=True).start()

  # ------------------------------------------------------------------ driver calls

  def ready(self) -> dict:
    return {"address": self.server.address(), "pid": os.getpid(),
            "cache_pages": self.cache_pages}

  def submit(self, items: list[dict]) -> None:
    for item in items:
      state = _state(item, self.outbox)
      self.worker.put(state, front=item.get("front", False))

  def abort(self, request_id: str) -> None:
    for state in self.worker.pending():
      if state.request_id == request_id:
        state.aborted = True
    self.worker.wake()

  def release(self, uuids: list[int]) -> None:
    """The decode side pulled these: forget them."""
    with self._lock:
      for uuid in uuids:
        self.offers.pop(uuid, None)

  def poll(self) -> dict:
    with self._lock:
      offered = len(self.offers)
    return {"events": self.outbox.take(), "offers": offered,
            "queued_tokens": sum(s.num_to_compute - s.num_computed
                                 for s in self.worker.pending()),
            "work": _work(self.worker)}

  # ------------------------------------------------------------------ worker callbacks

  def _offer(self, request, pieces, bucket: int | None) -> None:
    """Offers each KV piece for pulling as soon as it is cut (one pull per piece); the
    request's last pieces come with its bucket, and then the driver hears it is prefilled."""
    parts = self._parts.setdefault(request.request_id, [])
    for piece in pieces:
      blocks = self.plan.source_blocks(piece.arrays)
      uuid = next(self._uuids)
      with self._lock:
        self.offers[uuid] = (time.time(), blocks)
      self.server.await_pull(uuid, blocks)
      parts.append({"uuid": uuid, "layers": list(piece.layers), "first_page": piece.first_page,
                    "pages": piece.num_pages})
    if bucket is None:
      return
    del self._parts[request.request_id]
    self.worker.staging.release(request)
    m = request.metrics
    self.outbox.add({"kind": "prefilled", "request_id": request.request_id, "pieces": parts,
                     "bucket": bucket, "computed": len(request.tokens_to_compute),
                     "cached": request.cached_tokens or 0,
                     "output_ids": list(request.output_ids), "logprobs": _logprobs(request),
                     "time": time.time(),
                     "prefill_start": m.prefill_start and _wall(m.prefill_start),
                     "first_token": m.first_token and _wall(m.first_token)})

  def _discard(self, request) -> None:
    """The request ended at prefill: its offered pieces expire at the next sweep."""
    with self._lock:
      for part in self._parts.pop(request.request_id, []):
        if part["uuid"] in self.offers:
          self.offers[part["uuid"]] = (0.0, self.offers[part["uuid"]][1])

  def _finished(self, request) -> None:
    m = request.metrics
    self.outbox.add({"kind": "finished", "request_id": request.request_id,
                     "output_ids": list(request.output_ids), "logprobs": _logprobs(request),
                     "finish_reason": request.finish_reason or ("abort" if request.aborted
                                                                 else "error"),
                     "cached": request.cached_tokens or 0,
                     "time": time.time(), "prefill_start": m.prefill_start and _wall(
                         m.prefill_start), "first_token": m.first_token and _wall(
                             m.first_token)})

  def _expire_loop(self) -> None:
    """Offers never pulled within the lease are pulled by this worker itself, which takes them
    off the transfer server so their memory is freed."""
    connection = None
    while True:
      time.sleep(min(1.0, self.spec.kv_lease_s / 4))
      now = time.time()
      with self._lock:
        expired = [(u, o) for u, o in self.offers.items() if now - o[0] > self.spec.kv_lease_s]
        for uuid, _ in expired:
          del self.offers[uuid]
      for uuid, (_, blocks) in expired:
        connection = connection or self.server.connect(self.server.address())
        specs = [self.jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=b.sharding)
                 for b in blocks]
        self.jax.block_until_ready(connection.pull(uuid, specs))
        self.outbox.add({"kind": "expired", "uuid": uuid, "time": time.time()})


class DecodeServer:
  """A decode worker: pulls arrived requests' KV and runs the continuous-batching decode loop."""

  def __init__(self, spec: WorkerSpec):
    import jax  # pylint: disable=g-import-not-at-top
    model, config, limits, steps, server = _build(spec)
    from disagg_jax.engine import buckets, memory  # pylint: disable=g-import-not-at-top
    from disagg_jax.engine.colocated import ChunkedPrefill  # pylint: disable=g-import-not-at-top
    from disagg_jax.engine.decode_core import DecodeCore  # pylint: disable=g-import-not-at-top
    from disagg_jax.engine.prefill_cache import decode_prefill_tokens  # pylint: disable=g-import-not-at-top
    from disagg_jax.kv.prefix_cache import cache_salt  # pylint: disable=g-import-not-at-top
    from disagg_jax.engine.disagg import DisaggDecodeLoop, StagingBudget  # pylint: disable=g-import-not-at-top
    from disagg_jax.transfer.pieces import parse_transfer  # pylint: disable=g-import-not-at-top
    from disagg_jax.transfer.plan import DecodeLayout  # pylint: disable=g-import-not-at-top
    self.spec, self.jax, self.server, self.model = spec, jax, server, model
    self.layout = DecodeLayout(model.cfg, model.mesh)
    if self.layout.d != spec.decode_blocks:
      raise ValueError(f"decode mesh holds {self.layout.d} KV blocks, the plan expects "
                       f"{spec.decode_blocks}")
    self.pool = memory.plan_engine_pool(config, limits, "disagg", model)
    # With decode-side prefill, the pool caches what ends here and the driver sends this
    # worker the requests whose prefix it probably holds (`prefill_here`).
    self.max_tail = decode_prefill_tokens(config, model.mesh)
    self.core = DecodeCore(steps, num_slots=config.decode_batch,
                           pages_per_shard=self.pool.pages_per_shard,
                           max_seq_len=limits.max_seq_len, prefix_caching=self.max_tail > 0,
                           salt=cache_salt(model.cfg))
    self.core.params = model.params
    self.outbox = _Outbox()
    # Pulls are routed here only while pages are free (the driver's view): no staging limit.
    self.page_size = config.page_size
    self.loop = DisaggDecodeLoop(
        self.core, length_buckets=buckets.length_buckets(limits.max_seq_len, config.page_size),
        finish=self._finished, requeue=self._preempted, staging=StagingBudget(2**62),
        layers_per_group=parse_transfer(config.transfer, model.cfg.num_layers),
        chunks=ChunkedPrefill(self.core, chunk_size=config.chunk_size,
                              chunk_batch=config.chunk_batch, max_tail=self.max_tail)
        if self.max_tail > 0 else None, run_ahead=config.run_ahead)
    spec_of = lambda layers, pages: jax.ShapeDtypeStruct(
        self.layout.shape(pages * config.page_size, layers), model.dtype,
        sharding=self.layout.sharding)
    for _, thunk in self.loop.shapes(config.precompile_tokens(limits.max_seq_len), spec_of):
      thunk()
    self._connections: dict[str, Any] = {}
    self._pulls: queue.Queue = queue.Queue()
    threading.Thread(target=self.loop.run, daemon=True).start()
    threading.Thread(target=self._pull_loop, daemon=True).start()

  # ------------------------------------------------------------------ driver calls

  def ready(self) -> dict:
    return {"address": self.server.address(), "pid": os.getpid(),
            "total_pages": self.core.slots.capacity,
            "seq_pages": self.pool.usable_pages_per_shard,
            "decode_prefill_tokens": self.max_tail,
            "cache_pages": self.core.slots.capacity if self.max_tail > 0 else 0}

  def accept(self, item: dict) -> None:
    """A prefilled request: pull its KV from `item["address"]` and start decoding it."""
    self._pulls.put(item)

  def prefill_here(self, item: dict) -> None:
    """A request whose prefix this pool probably holds: its uncached tail is prefilled here."""
    self.loop.admit_local(_state(item, self.outbox))

  def abort(self, request_id: str) -> None:
    for state in [s for s in self.core.slots.requests if s is not None] + [
        entry[0] for entry in list(self.loop.queue)] + list(self.loop.local):
      if state.request_id == request_id:
        state.aborted = True
    self.loop.wake()

  def poll(self) -> dict:
    slots = self.core.slots
    return {"events": self.outbox.take(), "free_pages": slots.num_free,
            "total_pages": slots.capacity, "running": len(slots.occupied()),
            "waiting": len(self.loop.queue) + self._pulls.qsize(), "work": _work(self.loop),
            "slots": slots.num_slots}

  # ------------------------------------------------------------------ internals

  def _pull_loop(self) -> None:
    while True:
      item = self._pulls.get()
      started = time.time()
      try:
        blocks = self._pull(item)
      except Exception as e:  # pylint: disable=broad-except
        self.outbox.add({"kind": "pull_failed", "request_id": item["request_id"],
                         "error": f"{type(e).__name__}: {e}", "time": time.time()})
        continue
      state = _state(item, self.outbox)
      state.metrics.transfer_start, state.metrics.transfer_end = started, time.time()
      self.outbox.add({"kind": "pulled", "request_id": item["request_id"],
                       "uuids": [part["uuid"] for part in item["pieces"]],
                       "prefill_id": item["prefill_id"], "transfer_start": started,
                       "transfer_end": time.time()})
      self.loop.deliver(state, blocks, item["bucket"])

  def _pull(self, item: dict) -> list:
    """Pulls the request's KV pieces, one pull each, in the order they were offered."""
    from disagg_jax.transfer.pieces import Piece  # pylint: disable=g-import-not-at-top
    address = item["address"]
    if address not in self._connections:
      self._connections[address] = self.server.connect(address)
    out = []
    for part in item["pieces"]:
      start, stop = part["layers"]
      specs = self.layout.pull_specs(part["pages"] * self.page_size, self.model.dtype,
                                     stop - start)
      result: list = []
      thread = threading.Thread(target=lambda specs=specs, part=part: result.append(
          self.jax.block_until_ready(self._connections[address].pull(part["uuid"], specs))),
                                daemon=True)
      thread.start()
      thread.join(self.spec.pull_timeout_s)
      if not result:
        raise TimeoutError(f"pull {part['uuid']} from {address} took over "
                           f"{self.spec.pull_timeout_s} s")
      out.append(Piece((start, stop), part["first_page"], part["pages"],
                       self.layout.assemble(result[0])))
    return out

  def _finished(self, request) -> None:
    m = request.metrics
    self.outbox.add({"kind": "finished", "request_id": request.request_id,
                     "finish_reason": request.finish_reason or ("abort" if request.aborted
                                                                 else "error"),
                     "cached": request.cached_tokens or 0, "time": time.time(),
                     "prefill_start": m.prefill_start and _wall(m.prefill_start)})

  def _preempted(self, request) -> None:
    """No prefill here: hand the request back to the driver to recompute elsewhere."""
    self.outbox.add({"kind": "preempted", "request_id": request.request_id,
                     "output_ids": list(request.output_ids), "time": time.time()})


def _work(worker) -> dict:
  """A worker thread's work counters (`engine.worker.Worker.record_work`), for the driver's
  elastic signals: named as `Engine.load`'s after its "prefill_" / "decode_" prefix."""
  return {"tokens": worker.tokens_done, "busy_s": worker.busy_s, "steps": worker.steps_done,
          "rows_sq": worker.tokens_sq, "rows_busy": worker.tokens_busy}


def _logprobs(request) -> list:
  """A request's per-token log-probabilities as JSON (None where not computed here)."""
  return [lp and lp.to_json() for lp in request.logprobs]


def _wall(perf_time: float) -> float:
  """A time.perf_counter() stamp of this process as wall-clock time."""
  return perf_time - time.perf_counter() + time.time()


