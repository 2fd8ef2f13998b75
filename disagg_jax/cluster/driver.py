"""The cluster engine: the Engine API over prefill and decode workers in separate processes.

    engine = ClusterEngine(model_path, EngineConfig(...), num_prefill_workers=2,
                           num_decode_workers=1, prefill_devices=1, decode_devices=1)
    stream = engine.add_request(prompt_ids, SamplingParams(...))   # as Engine

The driver only routes and relays: a request goes to a prefill worker chosen by
`--config.engine.routing` (`sched.routing`; by default the one likely to hold the longest
cached prefix of it, weighed against its queue), then to the decode worker with the most free
pages, which pulls the KV straight from the prefill worker (jax.experimental.transfer). One poller thread collects every worker's
events (tokens, finishes, pulls) and notices dead workers:
  - a prefill worker dies: its unfinished requests go to another prefill worker;
  - a decode worker dies: its requests end with an error, or are prefilled again elsewhere
    (`on_decode_failure="reprefill"`), each within `request_timeout_s`;
  - KV offered but never pulled is dropped by its prefill worker after `kv_lease_s`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from typing import Sequence

from absl import logging

from disagg_jax import parallel
from disagg_jax.cluster.workers import DecodeServer, PrefillServer, WorkerSpec
from disagg_jax.engine.api import EngineAPI
from disagg_jax.engine.elastic import ADDITIVE, ElasticMonitor, record_move, run_control
from disagg_jax.engine.engine import EngineConfig
from disagg_jax.engine.request import Limits, TokenLogprob, stop_ids, validate
from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams
from disagg_jax.engine.state import RequestState, TokenStream
from disagg_jax.kv.pages import pages_for
from disagg_jax.models.config import ModelConfig
from disagg_jax.models.loading import DEMO_MODEL_DIR
from disagg_jax.models.tokenizer import load_tokenizer
from disagg_jax.sched.elastic import TO_PREFILL, ElasticController
from disagg_jax.sched.routing import Candidate, Router
from disagg_jax.transfer.pieces import parse_transfer

FAILURE_POLICIES = ("error", "reprefill")
MAX_ATTEMPTS = 3  # prefills per request before it fails (pull failures, dead workers)


@dataclasses.dataclass(eq=False)
class _Worker:
  kind: str  # "prefill" | "decode"
  index: int
  actor: object
  address: str = ""
  pid: int = 0
  alive: bool = True
  requests: set = dataclasses.field(default_factory=set)  # request ids it holds
  queued_tokens: int = 0  # prefill: prompt tokens queued (driver's count)
  free_pages: int = 0  # decode: as last reported, minus what was sent since
  total_pages: int = 0
  seq_pages: int = 0  # decode: pages one sequence may hold (one dp shard of the pool)
  cache_pages: int = 0  # pages of its prefix cache (0: it does not cache)
  max_tail: int = 0  # decode: the longest uncached tail it prefills itself (0: none)
  offers: int = 0  # prefill: KV offers not yet pulled (or expired)
  expired: int = 0  # prefill: offers dropped after their lease
  pending_poll: object = None
  bundle: int = 0  # its placement-group bundle (a worker started in its place takes it)
  retiring: bool = False  # --elastic: draining before it retires; nothing new is routed to it
  retired: bool = False  # --elastic: stopped on purpose (not counted as dead)
  work: dict = dataclasses.field(default_factory=dict)  # its counters, as last reported
  slots: int = 0  # decode: its decode batch
  running: int = 0  # decode: sequences it holds, as last reported

  @property
  def name(self) -> str:
    return f"{self.kind} worker {self.index} (pid {self.pid})"


@dataclasses.dataclass(eq=False)
class _Request:
  state: RequestState
  attempts: int = 0
  prefill: _Worker | None = None
  decode: _Worker | None = None


def _set_info(worker: _Worker, info: dict) -> None:
  """A worker's `ready()` answer: where it listens, its pool and its cache."""
  worker.address, worker.pid = info["address"], info["pid"]
  worker.free_pages = worker.total_pages = info.get("total_pages", 0)
  worker.seq_pages = info.get("seq_pages", 0)
  worker.cache_pages = info.get("cache_pages", 0)
  worker.max_tail = info.get("decode_prefill_tokens", 0)


def _perf(wall: float | None) -> float | None:
  """A worker's wall-clock stamp on this process's perf_counter scale."""
  return None if wall is None else wall - time.time() + time.perf_counter()


class ClusterEngine(EngineAPI):
  """Disaggregated serving over Ray actors; the same API as `Engine` (`engine.api.EngineAPI`)."""

  mode = "disagg"

  def __init__(self, model_path: str | None, config: EngineConfig, *,
               num_prefill_workers: int = 1, num_decode_workers: int = 1,
               prefill_devices: int = 1, decode_devices: int = 1, prefill_tp: int = 0,
               decode_tp: int = 0, dtype: str = "float32",
               prefill_cpus: Sequence[Sequence[int]] = (),
               decode_cpus: Sequence[Sequence[int]] = (), on_decode_failure: str = "reprefill",
               kv_lease_s: float = 30.0, pull_timeout_s: float = 30.0,
               request_timeout_s: float = 600.0, ray_address: str | None = None,
               worker_gpus: bool = False, driver_cpus: Sequence[int] = (),
               compilation_cache_dir: str | None = None, progress: bool = True,
               elastic=None):
    import ray  # pylint: disable=g-import-not-at-top
    from ray.util.placement_group import placement_group  # pylint: disable=g-import-not-at-top
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # pylint: disable=g-import-not-at-top
    if on_decode_failure not in FAILURE_POLICIES:
      raise ValueError(f"on_decode_failure={on_decode_failure!r} is not one of "
                       f"{', '.join(FAILURE_POLICIES)}")
    if num_prefill_workers < 1 or num_decode_workers < 1:
      raise ValueError(f"need at least one prefill and one decode worker, got "
                       f"{num_prefill_workers} and {num_decode_workers}")
    model_dir = model_path or DEMO_MODEL_DIR
    self.model_cfg = ModelConfig.from_dir(model_dir)
    prefill_tp, decode_tp = prefill_tp or prefill_devices, decode_tp or decode_devices
    for devices, tp, what in ((prefill_devices, prefill_tp, "prefill"),
                              (decode_devices, decode_tp, "decode")):
      if devices % tp:
        raise ValueError(f"--{what}_tp={tp} does not divide --{what}_devices={devices}")
      parallel.check_tp(self.model_cfg, tp)
    parse_transfer(config.transfer, self.model_cfg.num_layers)  # a bad value fails here, once
    self.router = Router(config.routing, config.page_size)
    self.config = config
    self.limits = Limits.for_model(self.model_cfg, config.max_seq_len, config.max_prefill_length)
    self.tokenizer = load_tokenizer(model_dir, self.model_cfg.bos_token_id,
                                    (self.model_cfg.eos_token_ids or (None,))[0])
    self.on_decode_failure = on_decode_failure
    self.request_timeout_s = request_timeout_s
    self.num_devices = (num_prefill_workers * prefill_devices
                        + num_decode_workers * decode_devices)
    decode_blocks = decode_tp if self.model_cfg.num_kv_heads % decode_tp == 0 else 1

    if driver_cpus:  # before ray.init: Ray's own processes inherit it
      os.sched_setaffinity(0, set(driver_cpus))
    if not ray.is_initialized():
      ray.init(address=ray_address, include_dashboard=False, log_to_driver=False,
               configure_logging=False, ignore_reinit_error=True,
               num_cpus=None if ray_address or os.environ.get("RAY_ADDRESS") else os.cpu_count())
    self._ray = ray
    engine_fields = dataclasses.asdict(config)

    def spec(kind, i, devices, tp, cores):
      return WorkerSpec(f"{kind}-{i}", model_path, dtype, devices, tp, engine_fields,
                        decode_blocks, tuple(cores[i]) if i < len(cores) else (),
                        kv_lease_s=kv_lease_s, pull_timeout_s=pull_timeout_s,
                        compilation_cache_dir=compilation_cache_dir)

    kinds = ([("prefill", i, prefill_devices, prefill_tp, prefill_cpus, PrefillServer)
              for i in range(num_prefill_workers)]
             + [("decode", i, decode_devices, decode_tp, decode_cpus, DecodeServer)
                for i in range(num_decode_workers)])
    # One bundle per worker, spread over the cluster's nodes (one node here).
    self._placement = placement_group([{"CPU": 0.01}] * len(kinds), strategy="SPREAD")
    ray.get(self._placement.ready())
    roles = {"prefill": (prefill_devices, prefill_tp, prefill_cpus, PrefillServer),
             "decode": (decode_devices, decode_tp, decode_cpus, DecodeServer)}

    def start_worker(kind: str, i: int, bundle: int) -> _Worker:
      devices, tp, cores, cls = roles[kind]
      options = {"num_cpus": 0.01, "max_restarts": 0, "scheduling_strategy":
                 PlacementGroupSchedulingStrategy(self._placement, bundle)}
      if worker_gpus:
        options["num_gpus"] = devices
      actor = ray.remote(cls).options(**options).remote(spec(kind, i, devices, tp, cores))
      return _Worker(kind, i, actor, bundle=bundle)

    self._start_worker = start_worker  # --elastic starts workers in retired ones' places
    self._devices = {"prefill": prefill_devices, "decode": decode_devices}
    workers = [start_worker(kind, i, bundle)
               for bundle, (kind, i, *_) in enumerate(kinds)]
    start = time.perf_counter()
    for worker, info in zip(workers, ray.get([w.actor.ready.remote() for w in workers])):
      _set_info(worker, info)
    if progress:
      print(f"{len(workers)} workers ready in {time.perf_counter() - start:.0f} s", flush=True)
    self.prefill_workers = [w for w in workers if w.kind == "prefill"]
    self.decode_workers = [w for w in workers if w.kind == "decode"]
    # The longest sequence every decode worker can hold (pages of one dp shard of its pool).
    self.page_capacity = min(w.seq_pages for w in self.decode_workers)

    self._requests: dict[str, _Request] = {}
    self._lock = threading.RLock()  # re-entrant: finishing happens inside routing
    self._ids = itertools.count()
    self._to_release: dict[int, list[int]] = {}  # prefill index -> pulled uuids
    self.error: str | None = None
    self._stopped = False
    self._poller = threading.Thread(target=self._poll_loop, daemon=True,
                                    name="disagg_jax-ClusterPoller")
    self._poller.start()
    # --elastic: workers change role (one retires after draining, one of the other kind starts
    # in its place) as `sched.elastic.ElasticController` decides from the workers' signals.
    self.progress = progress
    self.switches: list[dict] = []
    self._moving = threading.Lock()
    self._stop_control = threading.Event()
    self.controller = self.monitor = None
    self._control = None
    if elastic is not None:
      self.monitor, self.controller = ElasticMonitor(elastic), ElasticController(elastic)
      self._control = threading.Thread(target=self._control_loop, daemon=True,
                                       name="disagg_jax-ClusterElastic")
      self._control.start()
    self.split_timeline = [[0.0, *self._split()]]

  # ------------------------------------------------------------------ the EngineAPI

  def add_request(self, prompt_token_ids: Sequence[int], sampling: SamplingParams | None = None,
                  request_id: str | None = None, on_token=None) -> TokenStream:
    if self.error:
      raise RuntimeError(f"the cluster has stopped: {self.error}")
    sampling = sampling or SamplingParams()
    prompt = list(prompt_token_ids)
    validate(prompt, sampling, self.model_cfg, self.limits)
    need = pages_for(len(prompt) + sampling.max_new_tokens, self.config.page_size)
    if need > self.page_capacity:
      raise InvalidRequestError(
          f"prompt + max_new_tokens needs {need} pages of {self.config.page_size} tokens; a "
          f"decode worker's pool holds {self.page_capacity} per dp shard "
          "(--config.engine.memory_fraction, --config.engine.num_pages)")
    request_id = request_id or f"req-{next(self._ids)}"
    on_done = None
    if self.monitor is not None:
      on_token, on_done = self.monitor.watch(len(prompt), sampling, on_token)
    state = RequestState(request_id, prompt, sampling, stop_ids(sampling, self.model_cfg),
                         TokenStream(request_id, on_token))
    if on_done is not None:
      state.stream.add_done_callback(on_done)
    with self._lock:
      if request_id in self._requests:
        raise InvalidRequestError(f"request_id {request_id!r} is already in use")
      request = self._requests[request_id] = _Request(state)
      if not self._send_to_decode_first(request):
        self._send_to_prefill(request)
    return state.stream

  def abort(self, request_id: str) -> bool:
    with self._lock:
      request = self._requests.get(request_id)
      if request is None:
        return False
      request.state.aborted = True
      for worker in (request.prefill, request.decode):
        if worker is not None and worker.alive:
          worker.actor.abort.remote(request_id)
    return True

  def stats(self) -> dict:
    with self._lock:
      prefill_devices, decode_devices = self._split()
      return {"mode": "disagg", "cluster": "ray", "in_flight": len(self._requests),
              "prefill_workers_alive": sum(w.alive for w in self.prefill_workers),
              "decode_workers_alive": sum(w.alive for w in self.decode_workers),
              "prefill_workers": sum(not w.retired for w in self.prefill_workers),
              "decode_workers": sum(not w.retired for w in self.decode_workers),
              "prefill_devices": prefill_devices, "decode_devices": decode_devices,
              "split_changes": len(self.switches),
              "waiting": sum(w.queued_tokens > 0 for w in self.prefill_workers),
              "free_pages": sum(w.free_pages for w in self.decode_workers if w.alive),
              "total_pages": sum(w.total_pages for w in self.decode_workers if w.alive),
              "kv_offers": sum(w.offers for w in self.prefill_workers if w.alive),
              "kv_offers_expired": sum(w.expired for w in self.prefill_workers)}

  def health(self) -> tuple[str, str | None]:
    """Unavailable when a phase has no live worker, degraded when some worker died."""
    if self.error:
      return "unavailable", self.error
    with self._lock:
      phases = [(kind, sum(w.alive for w in workers), sum(not w.retired for w in workers))
                for kind, workers in (("prefill", self.prefill_workers),
                                      ("decode", self.decode_workers))]
    for kind, alive, total in phases:
      if not alive:
        return "unavailable", f"no {kind} worker is alive (all {total} died)"
    dead = [f"{total - alive} of {total} {kind} workers died" for kind, alive, total in phases
            if alive < total]
    return ("degraded", "; ".join(dead)) if dead else ("ok", None)

  def shutdown(self) -> None:
    self._stopped = True
    self._poller.join(timeout=30)
    self._stop_control.set()
    if self._control is not None:
      self._control.join(timeout=30)
    with self._lock:
      pending = list(self._requests.values())
    for request in pending:
      request.state.aborted = True
      self._finish(request, None)
    for worker in self.prefill_workers + self.decode_workers:
      try:
        self._ray.kill(worker.actor)
      except Exception:  # pylint: disable=broad-except
        pass
    self._ray.util.remove_placement_group(self._placement)

  # ------------------------------------------------------------------ --elastic

  @property
  def split_changes(self) -> int:
    return len(self.switches)

  def _split(self) -> tuple[int, int]:
    """(prefill devices, decode devices) of the workers serving or draining, not retired."""
    return tuple(self._devices[kind] * sum(not w.retired for w in workers)
                 for kind, workers in (("prefill", self.prefill_workers),
                                       ("decode", self.decode_workers)))

  def move_worker(self, to: str, reason: str = "requested", timeout_s: float = 600.0) -> dict:
    """Moves one worker to the `to` side ("prefill" | "decode"): the least loaded worker of the
    other side takes nothing new, drains (a prefill worker until its queue is prefilled and its
    KV pulled, a decode worker until its sequences end; nothing is lost or recomputed) and
    retires, and a worker of the `to` kind starts in its place (its bundle, the new kind's
    devices and TP). Each side keeps at least one worker. Returns the move's record."""
    if to not in ("prefill", "decode"):
      raise ValueError(f"move_worker to={to!r} is not 'prefill' or 'decode'")
    with self._moving:
      start = time.perf_counter()
      with self._lock:
        source = self.decode_workers if to == "prefill" else self.prefill_workers
        serving = self._serving(source)
        if len(serving) < 2:
          raise ValueError(f"cannot move a worker to {to}: the other side has "
                           f"{len(serving)} serving (each side keeps one)")
        worker = min(serving, key=lambda w: (len(w.requests), w.queued_tokens, w.running))
        worker.retiring = True
      while worker.alive and (worker.requests or worker.offers):
        if time.perf_counter() - start > timeout_s:
          raise TimeoutError(f"{worker.name} did not drain within {timeout_s} s")
        time.sleep(0.05)
      drained = time.perf_counter()
      with self._lock:
        worker.alive, worker.retired = False, True
      try:
        self._ray.kill(worker.actor)
      except Exception:  # pylint: disable=broad-except
        pass
      workers = self.prefill_workers if to == "prefill" else self.decode_workers
      new = self._start_worker(to, len(workers), worker.bundle)
      _set_info(new, self._ray.get(new.actor.ready.remote()))
      with self._lock:
        workers.append(new)
      done = time.perf_counter()
      prefill, decode = self._split()
      switch = {"time": done - (self.monitor.start if self.monitor else start),
                "prefill_devices": prefill, "decode_devices": decode, "reason": reason,
                "retired": worker.name, "started": new.name, "drain_s": drained - start,
                "start_s": done - drained, "recomputed_tokens": 0}
      self.switches.append(switch)
      record_move(self.split_timeline, switch["time"], prefill, decode, self.progress,
                  f"elastic: {prefill}P:{decode}D devices at {switch['time']:.1f} s ({reason}); "
                  f"{worker.name} drained in {switch['drain_s']:.1f} s and retired, {new.name} "
                  f"ready in {switch['start_s']:.1f} s")
      return switch

  def report(self) -> dict:
    """The run's elastic record (as `ElasticEngine.report`)."""
    return {"split_changes": self.split_changes, "split_timeline": self.split_timeline,
            "elastic_switches": self.switches,
            "elastic_decisions": [d.to_json() for d in self.controller.log]
                                 if self.controller else []}

  def signals(self):
    """The window's signals from the serving workers' reports (`engine.elastic.ElasticMonitor`;
    each worker's counters are its own, so its rates are a worker's)."""
    with self._lock:
      load = {k: 0 for k in ADDITIVE}
      for w in self.prefill_workers + self.decode_workers:  # retired ones keep their last counters: the sums only grow
        for key, value in w.work.items():
          if f"{w.kind}_{key}" in load:
            load[f"{w.kind}_{key}"] += value
      decoders = self._serving(self.decode_workers)
      load["queued_prefill_tokens"] = sum(w.queued_tokens for w in self._serving(
          self.prefill_workers))
      load["decode_slots"] = max((w.slots for w in decoders), default=1)
      slots = sum(w.slots for w in decoders) or 1
      pages = sum(w.total_pages for w in decoders) or 1
      return self.monitor.signals(
          load, prefill_workers=len(self._serving(self.prefill_workers)),
          decode_workers=len(decoders), slot_use=sum(w.running for w in decoders) / slots,
          page_use=1 - sum(w.free_pages for w in decoders) / pages, per_side=False,
          pages=(sum(w.total_pages - w.free_pages for w in decoders),
                 sum(w.total_pages for w in decoders)))

  def control_step(self) -> list[dict]:
    """One window: signals to the controller, and the moves it decides, one worker at a time."""
    action = self.controller.decide(self.signals())
    if action is None:
      return []
    decision = self.controller.log[-1]
    to = "prefill" if action == TO_PREFILL else "decode"
    moves = []
    for _ in range(decision.count):
      try:
        moves.append(self.move_worker(to, reason=decision.reason))
      except ValueError:  # the other side is down to one worker
        break
    return moves

  def _control_loop(self) -> None:
    run_control(self._stop_control, self.controller.config.window_s, self.control_step)

  # ------------------------------------------------------------------ routing (lock held)

  def _item(self, request: _Request) -> dict:
    s = request.state
    return {"request_id": s.request_id, "prompt_ids": s.prompt_ids,
            "sampling": dataclasses.asdict(s.sampling), "stop_ids": sorted(s.stop_ids),
            "output_ids": list(s.output_ids), "arrival": time.time()}

  def _send_to_prefill(self, request: _Request, front: bool = False) -> None:
    alive = self._serving(self.prefill_workers)
    if not alive:
      request.state.error = "no prefill worker is alive"
      self._finish(request, "error")
      return
    if request.attempts >= MAX_ATTEMPTS:
      request.state.error = (request.state.error or "") + f" (gave up after {MAX_ATTEMPTS} "\
                                                          "prefills)"
      self._finish(request, "error")
      return
    request.attempts += 1
    sequence = request.state.all_tokens()
    chosen = self.router.choose([self._candidate(w) for w in alive], sequence)
    worker = next(w for w in alive if ("prefill", w.index) == chosen)
    worker.queued_tokens += len(sequence)
    worker.requests.add(request.state.request_id)
    request.prefill, request.decode = worker, None
    item = self._item(request)
    item["front"] = front
    worker.actor.submit.remote([item])

  def _send_to_decode_first(self, request: _Request) -> bool:
    """Prefix routing with decode-side prefill: sends the request straight to the decode worker
    that probably holds its prefix (the rest at most its `decode_prefill_tokens`) and has the
    pages for it; False: it goes to prefill."""
    alive = self._serving(self.decode_workers)
    tokens = request.state.all_tokens()
    key = self.router.choose_local([self._candidate(w) for w in alive], tokens)
    worker = next((w for w in alive if ("decode", w.index) == key), None)
    need = pages_for(len(tokens) + 1, self.config.page_size)
    if worker is None or worker.free_pages < need:
      return False
    worker.free_pages -= need
    worker.requests.add(request.state.request_id)
    request.prefill, request.decode = None, worker
    worker.actor.prefill_here.remote(self._item(request))
    return True

  @staticmethod
  def _serving(workers: list[_Worker]) -> list[_Worker]:
    """The workers new requests may go to: alive and not retiring."""
    return [w for w in workers if w.alive and not w.retiring]

  @staticmethod
  def _candidate(worker: _Worker) -> Candidate:
    """The router's view of a worker (decode workers: load in pages taken)."""
    load = (worker.queued_tokens if worker.kind == "prefill"
            else worker.total_pages - worker.free_pages)
    return Candidate((worker.kind, worker.index), load, worker.cache_pages, worker.max_tail)

  def _send_to_decode(self, request: _Request, event: dict, prefill: _Worker) -> None:
    alive = self._serving(self.decode_workers)
    if not alive:
      request.state.error = "no decode worker is alive"
      self._finish(request, "error")
      return
    worker = max(alive, key=lambda w: w.free_pages)
    computed = event["computed"]
    worker.free_pages -= pages_for(computed + 1, self.config.page_size)
    worker.requests.add(request.state.request_id)
    request.decode = worker
    item = self._item(request)
    item.update(pieces=event["pieces"], bucket=event["bucket"], computed=computed,
                address=prefill.address, prefill_id=prefill.index)
    worker.actor.accept.remote(item)

  def _finish(self, request: _Request, reason: str | None) -> None:
    state = request.state
    with self._lock:
      if state.stream.done:
        return
      self._requests.pop(state.request_id, None)
      for worker in (request.prefill, request.decode):
        if worker is not None:
          worker.requests.discard(state.request_id)
      decode = request.decode
      if reason in ("stop", "length") and decode is not None and decode.max_tail:
        # Its decode pool caches the sequence's written tokens (all but the last).
        self.router.record(self._candidate(decode), state.all_tokens()[:-1])
    state.finish_reason = reason or state.finish_reason or ("abort" if state.aborted else "error")
    if state.finish_reason == "error" and not state.error:
      state.error = "the request failed"
    state.metrics.finished = time.perf_counter()
    state.stream.finish(state.output(self.tokenizer))

  # ------------------------------------------------------------------ the poller

  def _poll_loop(self) -> None:
    try:
      while not self._stopped:
        if not self._poll_once():
          time.sleep(0.002)
    except Exception as e:  # pylint: disable=broad-except
      self.error = f"cluster poller crashed: {type(e).__name__}: {e}"
      logging.exception(self.error)
      with self._lock:
        pending = list(self._requests.values())
      for request in pending:
        request.state.error = self.error
        self._finish(request, "error")

  def _poll_once(self) -> bool:
    """One round over every live worker; True if anything happened."""
    ray = self._ray
    live = [w for w in self.prefill_workers + self.decode_workers if w.alive]
    for worker in live:
      if worker.pending_poll is None:
        worker.pending_poll = worker.actor.poll.remote()
    ready, _ = ray.wait([w.pending_poll for w in live], num_returns=len(live), timeout=0.05)
    ready = set(ready)
    busy = False
    for worker in live:
      if worker.pending_poll not in ready:
        continue
      ref, worker.pending_poll = worker.pending_poll, None
      try:
        report = ray.get(ref)
      except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError,
              ray.exceptions.RayTaskError) as e:
        self._worker_died(worker, e)
        busy = True
        continue
      busy |= self._handle(worker, report)
    with self._lock:
      for index, uuids in self._to_release.items():
        if uuids and self.prefill_workers[index].alive:
          self.prefill_workers[index].actor.release.remote(uuids)
      self._to_release = {}
      self._expire_requests()
    return busy

  def _handle(self, worker: _Worker, report: dict) -> bool:
    events = report["events"]
    with self._lock:
      if worker.kind == "decode":
        worker.free_pages, worker.total_pages = report["free_pages"], report["total_pages"]
        worker.running, worker.slots = report["running"], report["slots"]
      else:
        worker.queued_tokens, worker.offers = report["queued_tokens"], report["offers"]
      worker.work = report["work"]
      for event in events:
        if event["kind"] == "expired":
          worker.expired += 1
          continue
        request = self._requests.get(event.get("request_id"))
        if request is not None:
          getattr(self, f"_on_{event['kind']}")(request, event, worker)
    return bool(events)

  def _emit(self, request: _Request, tokens: list[int], wall: float,
            logprobs: list | None = None) -> None:
    """Hands the request its next `tokens` (and their log-probabilities, JSON as the workers
    send them: `TokenLogprob.to_json`)."""
    now = _perf(wall)
    logprobs = logprobs or [None] * len(tokens)
    for token, logprob in zip(tokens, logprobs):
      logprob = TokenLogprob.from_json(logprob)
      request.state.output_ids.append(token)
      request.state.logprobs.append(logprob)
      request.state.metrics.token_times.append(now)
      request.state.stream.put(token, logprob)

  def _emit_new(self, request: _Request, event: dict) -> None:
    """The tokens of a worker's event (which lists all so far) the driver has not seen yet."""
    seen = len(request.state.output_ids)
    self._emit(request, event["output_ids"][seen:], event["time"],
               event.get("logprobs", [])[seen:])

  def _on_prefilled(self, request, event, worker) -> None:
    worker.requests.discard(request.state.request_id)
    self._cached(request, event)
    m = request.state.metrics
    m.prefill_start = m.prefill_start or _perf(event["prefill_start"])
    m.first_token = m.first_token or _perf(event["first_token"])
    self._emit_new(request, event)
    if request.state.aborted:
      self._finish(request, "abort")
      return
    self._send_to_decode(request, event, worker)

  def _on_finished(self, request, event, worker) -> None:
    m = request.state.metrics
    self._cached(request, event)
    if worker.kind == "decode":  # prefilled there, or an error before it prefilled
      m.prefill_start = m.prefill_start or _perf(event.get("prefill_start"))
    if worker.kind == "prefill":
      m.prefill_start = m.prefill_start or _perf(event["prefill_start"])
      m.first_token = m.first_token or _perf(event["first_token"])
      self._emit_new(request, event)
    self._finish(request, event["finish_reason"])

  @staticmethod
  def _cached(request, event) -> None:
    """The prompt tokens its first prefill found cached (later prefills do not count)."""
    if request.state.cached_tokens is None:
      request.state.cached_tokens = event.get("cached", 0)

  def _on_token(self, request, event, worker) -> None:
    del worker
    m = request.state.metrics
    m.first_token = m.first_token or _perf(event["time"])  # prefilled on the decode worker
    self._emit(request, [event["token"]], event["time"], [event.get("logprob")])

  def _on_pulled(self, request, event, worker) -> None:
    del worker
    m = request.state.metrics
    m.transfer_start, m.transfer_end = _perf(event["transfer_start"]), _perf(event["transfer_end"])
    self._to_release.setdefault(event["prefill_id"], []).extend(event["uuids"])

  def _on_preempted(self, request, event, worker) -> None:
    worker.requests.discard(request.state.request_id)
    request.state.metrics.preemptions += 1
    request.attempts -= 1  # preemption is not a failure
    self._send_to_prefill(request, front=True)

  def _on_pull_failed(self, request, event, worker) -> None:
    worker.requests.discard(request.state.request_id)
    request.state.error = f"KV pull failed on {worker.name}: {event['error']}"
    self._send_to_prefill(request, front=True)

  def _worker_died(self, worker: _Worker, error: Exception) -> None:
    with self._lock:
      worker.alive = False
      logging.warning("%s died: %s", worker.name, type(error).__name__)
      for request_id in list(worker.requests):
        request = self._requests.get(request_id)
        if request is None:
          continue
        if worker.kind == "prefill":
          self._send_to_prefill(request, front=True)
        elif self.on_decode_failure == "reprefill":
          self._send_to_prefill(request, front=True)
        else:
          request.state.error = f"{worker.name} died while decoding this request"
          self._finish(request, "error")
      worker.requests.clear()

  def _expire_requests(self) -> None:
    now = time.perf_counter()
    for request in list(self._requests.values()):
      if now - request.state.metrics.arrival > self.request_timeout_s:
        request.state.error = f"not finished within request_timeout_s={self.request_timeout_s}"
        self._finish(request, "error")
