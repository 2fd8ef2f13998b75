"""Elastic prefill:decode in one process: the devices of both meshes are one pool whose split
follows the traffic (`--elastic`).

    engine = ElasticEngine(prefill_model, decode_model, EngineConfig(...),
                           ElasticConfig(ttft_slo_s=2.0, tpot_slo_s=0.2))
    stream = engine.add_request(prompt_ids, SamplingParams(...))   # as with Engine
    engine.split_timeline                                           # [[t_s, P, D], ...]

The devices are ordered once (the prefill mesh's, then the decode mesh's); a split (P, prefill
TP, decode TP) gives the first P to prefill and the rest to decode, so a move hands the devices
at the boundary from one side to the other, and may change either side's tensor parallelism
(each side's devices a whole number of its TP groups, `splits`).

Every `ElasticConfig.window_s` a control thread reads the window's signals (`signals`: arrivals,
prefill queue and busy time, decode slot and page use, TTFT / TPOT attainment against the SLOs,
and the capacities measured on each side) and asks `sched.elastic.ElasticController` — the very
policy the simulator runs — whether to move. A move (`switch_to`) happens in two parts:

1. prepare, while the current engine keeps serving: meshes for the new split, the parameters
   re-placed device to device (`models.loading.place_on`; with a side's TP unchanged every shard
   boundary matches, so no parameter passes through the host), and a new `Engine` whose step
   shapes compile ahead (JAX's persistent cache makes a split seen before cheap). Its page pool is allocated beside the
   current one, so on TPU/GPU each engine takes half the usual share of free memory.
2. hand over, with new requests held for that moment: the current engine's threads stop
   (`Engine.detach`) and the new one adopts every unfinished request, oldest first, with its
   stream, outputs and timestamps. KV does not move: a request that held KV (prefilled, or
   decoding) restarts from its prompt and the tokens it generated — a preemption, counted with the
   tokens to recompute in the switch's record — so nothing is lost and greedy outputs are those of
   a static engine.

The controller chooses among every split (`options`); the capacities of a split not yet run are
the rates measured per device on the current one, scaled by its devices, with no speed-up
credited to another TP (ties keep the current TPs: a TP changes when the current one does not
divide a side's new device count, or when asked, `switch_to`). The decisions (with their
signals) are in `controller.log`, the moves in `switches`.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
import traceback
from typing import Sequence

from absl import logging

from disagg_jax import parallel
from disagg_jax.engine import memory
from disagg_jax.engine.api import EngineAPI
from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.engine.state import TokenStream
from disagg_jax.models.loading import Model, place_on
from disagg_jax.sched.elastic import ElasticConfig, ElasticController, Signals, SplitOption


# `Engine.load` counters that accumulate (the others are the current state).
ADDITIVE = ("prefill_tokens", "prefill_busy_s", "decode_tokens", "decode_busy_s", "decode_steps",
            "decode_rows_sq", "decode_rows_busy")


@dataclasses.dataclass(frozen=True)
class Switch:
  """One move of the split: when (seconds since start), the new split, what it cost."""
  time: float
  prefill_devices: int
  decode_devices: int
  reason: str
  prepare_s: float  # new meshes, parameters placed, steps compiled (while serving)
  pause_s: float  # the hand-over, with new requests held
  moved_requests: int  # unfinished requests the new engine adopted
  recomputed_tokens: int  # tokens of KV they lost and compute again
  prefill_tp: int = 1
  decode_tp: int = 1

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Prepared:
  """An engine built for a split, not yet serving (`ElasticEngine.prepare`)."""
  split: tuple[int, int, int]  # (prefill devices, prefill tp, decode tp)
  engine: Engine
  models: tuple[Model, Model]
  prepare_s: float


class _Window:
  """What happened since the controller last looked: arrivals, first tokens and finishes."""

  def __init__(self):
    self._lock = threading.Lock()
    self.arrivals: list[tuple[int, int]] = []  # (prompt tokens, requested output tokens)
    self.ttfts: list[float] = []
    self.tpots: list[float] = []

  def add(self, name: str, value) -> None:
    with self._lock:
      getattr(self, name).append(value)

  def take(self) -> tuple[list, list, list]:
    with self._lock:
      out = (self.arrivals, self.ttfts, self.tpots)
      self.arrivals, self.ttfts, self.tpots = [], [], []
    return out


def _smooth(old: float, new: float) -> float:
  """A capacity measured over one window, averaged with the earlier ones (weight 1/2): one noisy
  window does not swing the rate-matched split."""
  return new if old <= 0 else (old + new) / 2


def decode_capacity(work: dict, slots: int, tpot_slo_s: float) -> float:
  """Tokens/s the decode side serves at the largest batch (up to `slots`) whose step meets the
  TPOT SLO (at least one row), from a least-squares fit step_s = a + b x rows over the steps of
  `work` (`Engine.load` counters); the mean step's rate when the fit is degenerate."""
  n, x, y = work["decode_steps"], work["decode_tokens"], work["decode_busy_s"]
  spread = n * work["decode_rows_sq"] - x * x
  b = (n * work["decode_rows_busy"] - x * y) / spread if spread > 0 else 0.0
  a = (y - b * x) / n
  if b <= 0 or a <= 0:  # too little spread in batch sizes to see the slope
    return slots * n / y if y > 0 else 0.0
  rows = max(1, min(slots, int((tpot_slo_s - a) / b + 1e-6)))
  return rows / (a + b * rows)


class ElasticMonitor:
  """The controller's view of a running disaggregated engine, one window at a time: the requests
  it sees (`watch`: arrivals, first tokens, finishes) and the work counters of its workers
  (`Engine.load` keys, cumulative), turned into `Signals`. Shared by `ElasticEngine` and the
  `--cluster=ray` driver."""

  def __init__(self, config: ElasticConfig):
    self.config = config
    self.start = time.perf_counter()
    self._window = _Window()
    self._window_start = self.start
    self._last: dict | None = None
    # Capacity per worker measured so far (tokens/s): kept across moves and quiet windows.
    self._prefill_per_worker = 0.0
    self._decode_per_worker = 0.0

  def watch(self, prompt_len: int, sampling: SamplingParams, on_token=None):
    """Call before submitting a request: (its on_token, recording the first token, and a
    done-callback recording its TPOT) for the engine."""
    arrival = time.perf_counter()
    self._window.add("arrivals", (prompt_len, sampling.max_new_tokens))
    first = []

    def on_first(token: int) -> None:
      if not first:
        first.append(True)
        self._window.add("ttfts", time.perf_counter() - arrival)
      if on_token is not None:
        on_token(token)

    def on_done(output) -> None:
      times = output.metrics.token_times if output.metrics else []
      if output.finish_reason in ("stop", "length") and len(times) > 1:
        self._window.add("tpots", (times[-1] - times[0]) / (len(times) - 1))
    return on_first, on_done

  def signals(self, load: dict, *, prefill_workers: int, decode_workers: int,
              slot_use: float, page_use: float, per_side: bool,
              pages: tuple[int, int] = (0, 0)) -> Signals:
    """The window since the last call. `load`: cumulative work counters (`ADDITIVE`), the
    prompt tokens queued for prefill and `decode_slots`; `per_side`: the counters are one mesh
    per side (in-process: a side's rate is divided among its workers), else one worker's steps
    each (a cluster: the rates are a worker's already)."""
    now = time.perf_counter()
    window = max(now - self._window_start, 1e-6)
    self._window_start = now
    arrivals, ttfts, tpots = self._window.take()
    last = self._last or {k: 0 for k in ADDITIVE}
    self._last = load
    busy = load["prefill_busy_s"] - last["prefill_busy_s"]
    if busy > 0:  # prefill ran in the window: its speed
      rate = (load["prefill_tokens"] - last["prefill_tokens"]) / busy
      self._prefill_per_worker = _smooth(self._prefill_per_worker,
                                         rate / prefill_workers if per_side else rate)
    if load["decode_steps"] - last["decode_steps"] >= 8:  # enough steps to fit their time
      delta = {k: load[k] - last[k] for k in ADDITIVE}
      rate = decode_capacity(delta, load["decode_slots"], self.config.tpot_slo_s)
      self._decode_per_worker = _smooth(self._decode_per_worker,
                                        rate / decode_workers if per_side else rate)
    c = self.config
    return Signals(
        time=now - self.start, prefill_workers=prefill_workers, decode_workers=decode_workers,
        queued_prefill_tokens=load["queued_prefill_tokens"],
        prefill_tokens_per_s=self._prefill_per_worker * prefill_workers,
        prefill_busy=min(busy / window / (1 if per_side else max(prefill_workers, 1)), 1.0),
        decode_slot_use=slot_use, decode_page_use=page_use,
        ttft_attainment=(sum(t <= c.ttft_slo_s for t in ttfts) / len(ttfts)
                         if ttfts else None),
        tpot_attainment=(sum(t <= c.tpot_slo_s for t in tpots) / len(tpots)
                         if tpots else None),
        arriving_prompt_tokens_per_s=sum(a[0] for a in arrivals) / window,
        arriving_output_tokens_per_s=sum(a[1] for a in arrivals) / window,
        arriving_requests_per_s=len(arrivals) / window,
        decode_pages_used=pages[0], decode_pages_total=pages[1],
        decode_tokens_per_s_per_worker=self._decode_per_worker)


class ElasticEngine(EngineAPI):
  """A disaggregated engine whose prefill:decode device split moves (module docstring)."""

  mode = "disagg"

  def __init__(self, prefill_model: Model, decode_model: Model, config: EngineConfig,
               elastic: ElasticConfig, *, progress: bool = True, control: bool = True):
    if config.memory_fraction == 0 and not memory.is_cpu(decode_model.mesh):
      # A new engine's pool is allocated before the old one's is freed.
      config = dataclasses.replace(config,
                                   memory_fraction=memory.DEFAULT_FRACTION_ACCELERATOR / 2)
    self.devices = list(prefill_model.mesh.devices.flat) + list(decode_model.mesh.devices.flat)
    self.num_devices = len(self.devices)
    self.config = config
    self.progress = progress
    self._engine = Engine.create("disagg", prefill_model, decode_model, config, progress)
    self._models = (prefill_model, decode_model)
    self.limits = self._engine.limits
    self.tokenizer = self._engine.tokenizer
    self.model_cfg = self._engine.model_cfg
    self.controller = ElasticController(elastic)
    self.switches: list[Switch] = []
    p = prefill_model.mesh.size
    self.split = (p, parallel.tp_size(prefill_model.mesh), parallel.tp_size(decode_model.mesh))
    self.split_timeline: list[list] = [[0.0, p, self.num_devices - p]]
    self.monitor = ElasticMonitor(elastic)
    self._start = self.monitor.start
    self._lock = threading.RLock()  # a hand-over holds it: requests wait for the new engine
    self._switching = threading.Lock()  # one move at a time
    self._ids = itertools.count()
    self._done = {k: 0 for k in ADDITIVE}  # work counters of the engines already replaced
    self._stop = threading.Event()
    self._thread = None
    if control:
      self._thread = threading.Thread(target=self._control_loop, daemon=True,
                                      name="disagg_jax-ElasticControl")
      self._thread.start()

  # ------------------------------------------------------------------ EngineAPI

  @property
  def error(self) -> str | None:
    return self._engine.error

  @property
  def prefill_devices(self) -> int:
    return self.split[0]

  @property
  def split_changes(self) -> int:
    return len(self.switches)

  def add_request(self, prompt_token_ids: Sequence[int], sampling: SamplingParams | None = None,
                  request_id: str | None = None, on_token=None) -> TokenStream:
    sampling = sampling or SamplingParams()
    on_first, on_done = self.monitor.watch(len(prompt_token_ids), sampling, on_token)
    with self._lock:  # ids are this engine's, unique over every engine it ran
      stream = self._engine.add_request(prompt_token_ids, sampling,
                                        request_id or f"req-{next(self._ids)}", on_first)
    stream.add_done_callback(on_done)
    return stream

  def abort(self, request_id: str) -> bool:
    with self._lock:
      return self._engine.abort(request_id)

  def stats(self) -> dict:
    p = self.prefill_devices
    return {**self._engine.stats(), "prefill_devices": p, "decode_devices": self.num_devices - p,
            "split_changes": self.split_changes}

  def shutdown(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with self._switching:
      self._engine.shutdown()

  # ------------------------------------------------------------------ control

  def report(self) -> dict:
    """The run's elastic record, for the benchmark JSON: the split over time, every move and
    every decision with its signals."""
    return {"split_changes": self.split_changes, "split_timeline": self.split_timeline,
            "elastic_switches": [s.to_json() for s in self.switches],
            "elastic_decisions": [d.to_json() for d in self.controller.log]}

  def signals(self) -> Signals:
    """The window since the last call, as the controller reads it (a worker: one TP group)."""
    p, ptp, dtp = self.split
    load, stats = self._cumulative_load(), self._engine.stats()
    return self.monitor.signals(
        load, prefill_workers=p // ptp, decode_workers=(self.num_devices - p) // dtp,
        slot_use=stats["running"] / max(load["decode_slots"], 1),
        page_use=1 - stats["free_pages"] / max(stats["total_pages"], 1), per_side=True,
        pages=(stats["total_pages"] - stats["free_pages"], stats["total_pages"]))

  def splits(self) -> list[tuple[int, int, int]]:
    """The splits a move may go to, (prefill devices, prefill tp, decode tp): each side whole
    TP groups of a TP the model's heads allow, and decode slots that split evenly over the
    decode side's dp rows. The current TPs' splits first."""
    n, cfg = self.num_devices, self.model_cfg
    tps = [t for t in range(1, n) if parallel.allows_tp(cfg, t)]
    out = [(p, ptp, dtp) for p in range(1, n) for ptp in tps for dtp in tps
           if p % ptp == 0 and (n - p) % dtp == 0
           and self.config.decode_batch % ((n - p) // dtp) == 0]
    return sorted(out, key=lambda s: s[1:] != self.split[1:])

  def options(self, s: Signals) -> list[SplitOption]:
    """Every split with its sides' capacities and decode pages: the current one's per device,
    scaled; a prefill group of another TP is credited with the current group's speed (its
    prefill_workers counted in current-TP groups), so an unmeasured TP never wins on a guess."""
    (p, ptp, _), n = self.split, self.num_devices
    per_prefill = s.prefill_tokens_per_s / p
    per_decode = s.decode_tokens_per_s_per_worker * s.decode_workers / (n - p)
    pages = s.decode_pages_total / (n - p)
    return [SplitOption(split, split[0], n - split[0], per_prefill * split[0],
                        per_decode * (n - split[0]), max(split[0] // ptp, 1),
                        int(pages * (n - split[0]))) for split in self.splits()]

  def _cumulative_load(self) -> dict:
    """`Engine.load` with the work counters summed over every engine this one ran."""
    load = self._engine.load()
    return {**load, **{k: self._done[k] + load[k] for k in ADDITIVE}}

  def control_step(self) -> Switch | None:
    """One window: reads the signals, asks the controller, and makes the move it decides."""
    signals = self.signals()
    action = self.controller.decide(signals, self.options(signals), self.split)
    if action is None or self.error:
      return None
    decision = self.controller.log[-1]
    return self.switch_to(*decision.target, reason=decision.reason)

  def switch_to(self, prefill_devices: int, prefill_tp: int | None = None,
                decode_tp: int | None = None, reason: str = "requested") -> Switch | None:
    """Moves to the split (`prefill_devices` prefill devices, the rest decode; TPs kept unless
    given): `prepare`, then `hand_over`. None if already there."""
    with self._switching:
      prepared = self.prepare(prefill_devices, prefill_tp, decode_tp)
      return prepared and self.hand_over(prepared, reason)

  def prepare(self, prefill_devices: int, prefill_tp: int | None = None,
              decode_tp: int | None = None) -> "Prepared | None":
    """The engine of a split, built while the current one serves: meshes, parameters placed
    device to device, steps compiled. None if the split is the current one."""
    split = (prefill_devices, prefill_tp or self.split[1], decode_tp or self.split[2])
    p, ptp, dtp = split
    if split == self.split:
      return None
    if split not in self.splits():
      raise ValueError(f"the split ({p} prefill devices of {self.num_devices}, prefill tp "
                       f"{ptp}, decode tp {dtp}) is not one of {self.splits()}: each side takes "
                       f"whole groups of its tp, a tp the model's heads allow, and the decode "
                       f"side's dp must divide --config.engine.decode_batch="
                       f"{self.config.decode_batch}")
    start = time.perf_counter()
    models = (place_on(self._models[0], parallel.make_mesh(self.devices[:p], ptp)),
              place_on(self._models[1], parallel.make_mesh(self.devices[p:], dtp)))
    # Every step shape compiles now, off the serving path: a shape compiled on first use would
    # stall the new engine's threads right after the hand-over.
    engine = Engine.create("disagg", *models, dataclasses.replace(self.config, precompile_len=-1),
                           progress=False)
    return Prepared(split, engine, models, time.perf_counter() - start)

  def hand_over(self, prepared: "Prepared", reason: str = "requested") -> Switch | None:
    """Makes `prepared` the serving engine: the current one stops and the new one adopts its
    unfinished requests (new requests wait meanwhile). None (and `prepared` shut down) if this
    engine is shutting down."""
    if self._stop.is_set():
      prepared.engine.shutdown()
      return None
    start = time.perf_counter()
    with self._lock:
      states, lost = self._engine.detach()
      prepared.engine.adopt(states)
      old = self._engine.load()
      self._done = {k: self._done[k] + old[k] for k in ADDITIVE}
      self._engine, self._models = prepared.engine, prepared.models
      self.split = prepared.split
      done = time.perf_counter()
    (p, ptp, dtp), n = prepared.split, self.num_devices
    switch = Switch(done - self._start, p, n - p, reason, prepared.prepare_s, done - start,
                    len(states), lost, ptp, dtp)
    self.switches.append(switch)
    record_move(self.split_timeline, switch.time, p, n - p, self.progress,
                f"elastic: {p}P(TP{ptp}):{n - p}D(TP{dtp}) at {switch.time:.1f} s ({reason}); "
                f"prepared in {switch.prepare_s:.1f} s while serving, hand-over "
                f"{switch.pause_s * 1e3:.0f} ms, {len(states)} requests moved, {lost} tokens "
                f"to recompute")
    return switch

  def _control_loop(self) -> None:
    run_control(self._stop, self.controller.config.window_s, self.control_step)


def record_move(timeline: list, time_s: float, prefill: int, decode: int, progress: bool,
                line: str) -> None:
  """A move made: `[time, prefill devices, decode devices]` on the timeline, and its line printed
  (with `progress`) and logged."""
  timeline.append([round(time_s, 3), prefill, decode])
  if progress:
    print(line, file=sys.stderr, flush=True)
  logging.info(line)


def run_control(stop: threading.Event, window_s: float, step) -> None:
  """The control thread of an elastic engine: `step()` every `window_s` until `stop` is set. A
  failed move is logged and leaves the current split serving; the next window may try again."""
  while not stop.wait(window_s):
    try:
      step()
    except Exception:  # pylint: disable=broad-except
      logging.error("elastic move failed:\n%s", traceback.format_exc())
