"""Goodput-optimal configurations: enumerate, screen analytically, simulate the best.

Goodput follows DistServe: the highest request rate at which at least 90% of requests meet every
SLO; the planner ranks configurations by goodput per device. Every configuration of the space
(mode; TP per phase; prefill and decode workers; decode batch; prefill batch or chunk size) is
first screened with a closed-form capacity estimate (the rate each phase can sustain within the
SLOs, capped at the roofline), then the `simulate_top` best (at most `per_shape` of each mesh
shape, so the simulated set spans many shapes) are simulated with the engine's own policies
(disagg_jax/sim/simulator.py) at a search over rates. Independent replicas of a unit (a
colocated engine, or an xPyD group) share the load evenly, so a unit is simulated at rate /
replicas.

Goodput is a rate the system *sustains* (`Sustain`, docs/PLANNER.md): each rate is simulated for
an arrival window of at least `lifetimes` request lifetimes (TTFT SLO + 99th-percentile output x
the decode step of a full batch: how long a long request stays) and `ttft_multiple` TTFT SLOs,
with at least `min_requests` and at most `max_requests` requests; only requests arriving after
the first `warmup` fraction of the window are scored (the system starts empty); and the rate
counts only if the number of requests in the system does not keep growing (`steady`). Over such
a window an overload delays the last arrivals by many TTFT SLOs, or piles up requests waiting for
decode, so a burst the SLO slack absorbs no longer passes for a rate. The roofline
(analytic.roofline) bounds every unit's rate: the search does not look past 1.25 x it, and a
configuration that still meets its SLOs there is flagged (`above_roofline`): the model would be
wrong.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Sequence

import numpy as np

from disagg_jax.bench import arrivals as arrivals_lib
from disagg_jax.bench import metrics
from disagg_jax.engine import buckets
from disagg_jax.models.config import ModelConfig
from disagg_jax.sim import analytic, simulator
from disagg_jax.sim.profile import StepProfile

ATTAINMENT = 0.9
TP_CHOICES = (1, 2, 4, 8)
DECODE_BATCHES = (4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)
PREFILL_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)
CHUNK_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192)
CHUNK_BATCHES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Candidate:
  mode: str
  prefill_tp: int
  decode_tp: int
  num_prefill_workers: int
  num_decode_workers: int
  replicas: int
  decode_batch: int
  prefill_batch: int = 4
  chunk_size: int = 0
  chunk_batch: int = 1
  prefill_dp: int = 1  # data-parallel rows of a mesh (measured configurations only)
  decode_dp: int = 1

  @property
  def unit_devices(self) -> int:
    if self.mode == "colocated":
      return self.decode_tp * self.decode_dp
    return (self.num_prefill_workers * self.prefill_tp * self.prefill_dp
            + self.num_decode_workers * self.decode_tp * self.decode_dp)

  @property
  def devices(self) -> int:
    return self.unit_devices * self.replicas

  def describe(self) -> str:
    mesh = lambda tp, dp: f"TP{tp}" + (f"xDP{dp}" if dp > 1 else "")
    if self.mode == "colocated":
      return (f"colocated {mesh(self.decode_tp, self.decode_dp)} x{self.replicas}, decode batch "
              f"{self.decode_batch}, chunks {self.chunk_batch}x{self.chunk_size}")
    return (f"disagg {self.num_prefill_workers}P({mesh(self.prefill_tp, self.prefill_dp)})"
            f"{self.num_decode_workers}D({mesh(self.decode_tp, self.decode_dp)}) x{self.replicas}, "
            f"decode batch {self.decode_batch}, prefill batch {self.prefill_batch}")

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    colocated = self.mode == "colocated"
    out.update(prefill_devices=0 if colocated
               else self.num_prefill_workers * self.prefill_tp * self.prefill_dp,
               decode_devices=self.unit_devices if colocated
               else self.num_decode_workers * self.decode_tp * self.decode_dp,
               devices=self.devices)
    return out


@dataclasses.dataclass
class Workload:
  """Request lengths (a pool: a simulation of n requests takes the first n, cycling), SLOs
  (seconds), arrival burstiness and seed."""
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  slos: dict[str, float]
  burstiness: float = 1.0
  seed: int = 0

  def __post_init__(self):
    self.prompt_lens = np.asarray(self.prompt_lens, np.int64)
    self.output_lens = np.asarray(self.output_lens, np.int64)

  @property
  def max_seq_len(self) -> int:
    return int(max(self.prompt_lens + self.output_lens))

  def requests(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    index = np.arange(n) % len(self.prompt_lens)
    return self.prompt_lens[index], self.output_lens[index]

  def lifetime_s(self, tpot_s: float | None = None) -> float:
    """How long a long request stays in the system: the TTFT SLO + (99th-percentile output - 1)
    x the TPOT (`tpot_s`, an estimate of the decode step, else the SLO), or the E2E SLO when
    that is tighter (1 s for a term without an SLO). The percentile, not the mean: with
    heavy-tailed outputs (chat) the long requests hold most of the KV, and the load they bring
    builds up over their lifetime, not the mean one."""
    tpot = self.slos.get("tpot", 1.0) if tpot_s is None else tpot_s
    longest = float(np.percentile(self.output_lens, 99))
    out = self.slos.get("ttft", 1.0) + max(longest - 1, 0.0) * tpot
    return min(out, self.slos.get("e2el", math.inf))


@dataclasses.dataclass(frozen=True)
class Sustain:
  """How long each rate is simulated (see the module docstring), and the search's relative
  tolerance."""
  lifetimes: float = 3.0
  ttft_multiple: float = 20.0
  min_requests: int = 200
  max_requests: int = 12000
  # At most this many output tokens per run (the simulator's cost is about linear in them: some
  # 5 us each): a long-output workload on a large unit is cut there and marked not sustained.
  max_tokens: int = 1_000_000
  warmup: float = 1 / 3
  rel_tol: float = 0.03

  def window_s(self, workload: Workload, tpot_s: float | None = None) -> float:
    return max(self.lifetimes * workload.lifetime_s(tpot_s),
               self.ttft_multiple * workload.slos.get("ttft", 0.0))

  def wanted(self, rate: float, workload: Workload, tpot_s: float | None = None) -> int:
    return max(math.ceil(rate * self.window_s(workload, tpot_s)), self.min_requests)

  def num_requests(self, rate: float, workload: Workload, tpot_s: float | None = None) -> int:
    by_tokens = self.max_tokens / max(float(np.mean(workload.output_lens)), 1.0)
    cap = max(min(self.max_requests, int(by_tokens)), 1)
    return int(min(self.wanted(rate, workload, tpot_s), cap))


# The planner's goodput: three request lifetimes of arrivals (the first one a warm-up, in which
# the decode batch fills), at least 20 TTFT SLOs.
SUSTAIN = Sustain()


def tpot_estimate(profile, workload: Workload) -> float:
  """The decode step of a full batch at the workload's mean context (what sets how long a
  request stays at capacity), between half the TPOT SLO and the SLO."""
  slo = workload.slos.get("tpot", math.inf)
  ctx = float(np.mean(workload.prompt_lens) + np.mean(workload.output_lens) / 2)
  batch = min(profile.decode_batch, profile.num_pages * profile.page_size // max(int(ctx), 1))
  step = profile.decode_time(max(batch, 1), int(max(batch, 1) * ctx))
  return step if math.isinf(slo) else min(slo, max(slo / 2, step))


def tp_ok(cfg: ModelConfig, tp: int) -> bool:
  """Whether `tp` divides the KV heads (or is a multiple of them, which replicates them)."""
  return cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0


def enumerate_candidates(cfg: ModelConfig, hw: analytic.Hardware, num_devices: int,
                         max_seq_len: int,
                         prefill_hw: analytic.Hardware | None = None) -> list[Candidate]:
  """Every configuration on `num_devices` chips of `hw`; with a different `prefill_hw`, the
  disaggregated ones with prefill on that kind of chip (colocated needs one kind)."""
  out = []
  tps = [t for t in TP_CHOICES if t <= num_devices and tp_ok(cfg, t)]
  fits = {t: analytic.fits(cfg, hw, t, 1, max_seq_len)[0] for t in tps}
  prefill_hw = prefill_hw or hw
  prefill_fits = {t: analytic.fits(cfg, prefill_hw, t, 1, max_seq_len)[0] for t in tps}
  decode_fits = functools.lru_cache(maxsize=None)(lambda tp, prefill_batch: analytic.fits(
      cfg, hw, tp, 1, max_seq_len,
      staging_tokens=analytic.disagg_staging(max_seq_len, prefill_batch))[0])
  for tp, batch, chunk, chunk_batch in itertools.product(tps, DECODE_BATCHES, CHUNK_SIZES,
                                                         CHUNK_BATCHES):
    if (prefill_hw.name == hw.name and fits[tp]
        and chunk <= max(max_seq_len, CHUNK_SIZES[0])):
      out.append(Candidate("colocated", tp, tp, 0, 0, num_devices // tp, batch,
                           chunk_size=chunk, chunk_batch=chunk_batch))
  for ptp, dtp in itertools.product(tps, tps):
    if not (prefill_fits[ptp] and fits[dtp]):
      continue
    for x in range(1, num_devices // ptp + 1):
      for y in range(1, (num_devices - x * ptp) // dtp + 1):
        unit = x * ptp + y * dtp
        for batch, prefill_batch in itertools.product(DECODE_BATCHES, PREFILL_BATCHES):
          if not decode_fits(dtp, prefill_batch):
            continue  # the staging for a full prefill step leaves no room for one sequence
          out.append(Candidate("disagg", ptp, dtp, x, y, num_devices // unit, batch,
                               prefill_batch=prefill_batch))
  return out


def unit_profile(c: Candidate, cfg: ModelConfig, hw: analytic.Hardware, max_seq_len: int,
                 prefill_hw: analytic.Hardware | None = None, prompt_len: int | None = None,
                 layers_per_group: int | None = None, across_hosts: bool = False):
  if c.mode == "colocated":
    return analytic.profile_for(cfg, hw, mode="colocated", tp=c.decode_tp,
                                decode_batch=c.decode_batch, max_seq_len=max_seq_len,
                                chunk_size=c.chunk_size, chunk_batch=c.chunk_batch,
                                prompt_len=prompt_len)
  return analytic.profile_for(cfg, hw, mode="disagg", tp=c.decode_tp, prefill_tp=c.prefill_tp,
                              decode_batch=c.decode_batch, max_seq_len=max_seq_len,
                              prefill_batch=c.prefill_batch, prefill_hw=prefill_hw,
                              layers_per_group=layers_per_group, across_hosts=across_hosts)


def unit_roofline(c: Candidate, cfg: ModelConfig, hw: analytic.Hardware, workload: Workload,
                  prefill_hw: analytic.Hardware | None = None) -> analytic.Roofline:
  """The roofline of one unit of `c` (a colocated engine: both phases on its chips; an xPyD
  group: each phase on its own chips)."""
  if c.mode == "colocated":
    return analytic.roofline(cfg, workload.prompt_lens, workload.output_lens, hardware=hw,
                             devices=c.unit_devices)
  return analytic.roofline(cfg, workload.prompt_lens, workload.output_lens,
                           prefill_hw=prefill_hw or hw,
                           prefill_devices=c.num_prefill_workers * c.prefill_tp * c.prefill_dp,
                           decode_hw=hw,
                           decode_devices=c.num_decode_workers * c.decode_tp * c.decode_dp)


def _md1_utilization(service_s: float, ttft_slo: float) -> float:
  """The utilization at which an M/D/1 queue's mean wait plus the service time reaches the TTFT
  SLO (DistServe's model of the prefill queue): S + rho S / (2 (1 - rho)) <= T."""
  if service_s > ttft_slo:
    return 0.0
  if math.isinf(ttft_slo):
    return 1.0
  k = ttft_slo / service_s - 1
  return 2 * k / (1 + 2 * k)


def screen(c: Candidate, profile, workload: Workload) -> float:
  """A closed-form estimate of the unit's goodput (req/s): the rate its prefill and its decode
  can each sustain within the SLOs (prefill as an M/D/1 queue under the TTFT SLO; the decode
  batch cut to what the TPOT SLO allows; colocated, the decode steps slowed by the prompt chunks
  they carry)."""
  prompt, output = float(np.mean(workload.prompt_lens)), float(np.mean(workload.output_lens))
  tpot_slo = workload.slos.get("tpot", math.inf)
  ttft_slo = workload.slos.get("ttft", math.inf)
  ctx = prompt + output / 2
  batch = min(c.decode_batch, profile.num_pages * profile.page_size // max(int(ctx), 1))
  while batch > 1 and profile.decode_time(batch, int(batch * ctx)) > tpot_slo:
    batch //= 2
  if batch < 1:
    return 0.0
  step = profile.decode_time(batch, int(batch * ctx))
  if step > tpot_slo:
    return 0.0
  if profile.mode == "disagg":
    bucket = buckets.pick(min(int(math.ceil(prompt)), profile.length_buckets[-1]),
                          profile.length_buckets)
    alone = profile.prefill(1, bucket)
    prefill_rate = c.num_prefill_workers * _md1_utilization(alone, ttft_slo) / alone
    decode_rate = c.num_decode_workers * batch / (output * step)
    return min(prefill_rate, decode_rate)
  # colocated: a request's prompt takes ceil(prompt / chunk) chunk rows; a mixed step carries up
  # to chunk_batch rows, padded to one row per dp row or all of them (the engine's row buckets),
  # and every step (mixed or not) gives each decoding sequence a token, so the chunk steps also
  # stretch the TPOT; a request holds its slot from admission to its last token (Little's law against the
  # decode batch).
  length = buckets.pick(min(c.chunk_size, max(int(math.ceil(prompt)), 1)),
                        buckets.chunk_lens(c.chunk_size))
  per_shard = buckets.chunk_rows(c.chunk_batch, profile.dp)[-1]
  rows = per_shard * profile.dp  # chunks a step carries at most (every dp row)
  extra = step - profile.decode_s
  chunks = math.ceil(prompt / c.chunk_size)  # per request
  # The prompt's chunks run one step after another: a queue whose service is that sequence.
  alone = chunks * (profile.mixed(1, length) + extra)
  util = _md1_utilization(alone, ttft_slo)

  def sustainable(rate):
    # Prompts in flight at once (Little's law over one prompt's chunk steps) fill the rows.
    used = min(rows, max(1.0, rate * alone))
    mixed = (profile.mixed(1, length) if used <= profile.dp
             else profile.mixed(per_shard, length)) + extra
    chunk_steps = chunks / used
    busy = rate * chunk_steps * mixed  # share of time in mixed steps
    if busy > util or busy >= 1:
      return False
    steps_per_s = rate * chunk_steps + (1 - busy) / step
    tpot = 1 / steps_per_s
    return tpot <= tpot_slo and rate * (alone + output * tpot) <= batch

  lo, hi = 0.0, rows / (chunks * (profile.mixed(1, length) + extra))
  for _ in range(40):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if sustainable(mid) else (lo, mid)
  return lo


def attainment(c: Candidate, profile, workload: Workload, rate: float,
               sustain: Sustain = SUSTAIN) -> tuple[float, dict]:
  """SLO attainment of one unit at `rate` sustained (`sustain`), and the metrics of the scored
  requests (with the run's size: simulated_requests, scored_requests, arrival_window_s)."""
  tpot = tpot_estimate(profile, workload)
  n = sustain.num_requests(rate, workload, tpot)
  prompt_lens, output_lens = workload.requests(n)
  arrivals = arrivals_lib.arrival_times(n, rate, workload.burstiness, workload.seed)
  result = simulator.simulate(profile, prompt_lens, output_lens, arrivals,
                              num_prefill_workers=c.num_prefill_workers or 1,
                              num_decode_workers=c.num_decode_workers or 1)
  scored, duration = metrics.steady_state(result.records, arrivals, sustain.warmup)
  out = metrics.compute(scored, duration, workload.slos)
  # Steady: about as many requests in the system over the last quarter of the scored window as
  # over its first quarter (means of 30 instants each; within 5% and one Poisson deviation). A
  # backlog that keeps growing (say, prefilled requests waiting for decode slots, a wait the
  # TPOT of a long output averages away) is not a sustained rate: over the 1.5 lifetimes between
  # the quarters, an overload of 10% grows it by 15%.
  warm = arrivals[0] + sustain.warmup * (arrivals[-1] - arrivals[0])
  quarter = (arrivals[-1] - warm) / 4
  counts = metrics.in_system(result.records, arrivals,
                             np.concatenate([np.linspace(warm, warm + quarter, 30),
                                             np.linspace(arrivals[-1] - quarter, arrivals[-1],
                                                         30)]))
  before, after = float(np.mean(counts[:30])), float(np.mean(counts[30:]))
  out.update(in_system_early=before, in_system_late=after,
             steady=bool(after <= 1.05 * before + math.sqrt(before) + 2),
             request_rate=rate, simulated_requests=n, scored_requests=len(scored),
             arrival_window_s=float(arrivals[-1] - arrivals[0]),
             sustained=n >= sustain.wanted(rate, workload, tpot),
             page_stalls=getattr(result, "page_stalls", 0))
  return out["slo_attainment"], out


def sustained_attainment(c: Candidate, profile, workload: Workload, rate: float,
                         sustain: Sustain = SUSTAIN) -> tuple[bool, dict]:
  """Whether `rate` is sustained within the SLOs: >= 90% attainment and steady (`attainment`).
  A run that meets the SLOs while its backlog grew is run again over a window three times as
  long, whose verdict stands: the growth is an overload, or only the slow fluctuation of
  heavy-tailed lifetimes (chat), which a longer window averages out."""
  ok, out = attainment(c, profile, workload, rate, sustain)
  if ok is not None and ok >= ATTAINMENT and not out["steady"]:
    longer = dataclasses.replace(sustain, lifetimes=3 * sustain.lifetimes,
                                 ttft_multiple=3 * sustain.ttft_multiple,
                                 min_requests=3 * sustain.min_requests)
    ok, out = attainment(c, profile, workload, rate, longer)
    out["rechecked"] = True
  return bool(ok is not None and ok >= ATTAINMENT and out["steady"]), out


def goodput(c: Candidate, profile, workload: Workload, estimate: float, *,
            ceiling: float = math.inf, sustain: Sustain = SUSTAIN,
            max_runs: int = 16) -> tuple[float, dict | None]:
  """The highest unit rate with >= 90% SLO attainment, sustained and steady (`attainment`):
  from the estimate, steps of
  x1.5 up while it passes (or down until it does), then bisection until the bracket is within
  the tolerance. The search stops at 1.25 x `ceiling` (the unit's roofline): a rate that passes
  there is returned as it is, for the caller to flag."""
  rel_tol = sustain.rel_tol
  top = 1.25 * ceiling
  start = min(max(estimate, 1e-3), top)
  runs = 0

  def passes(rate):
    nonlocal runs
    runs += 1
    return sustained_attainment(c, profile, workload, rate, sustain)

  ok, out = passes(start)
  if ok:
    lo, best, hi = start, out, None
    while hi is None and lo < top and runs < max_runs:
      rate = min(lo * 1.5, top)
      ok, out = passes(rate)
      if ok:
        lo, best = rate, out
      else:
        hi = rate
    if hi is None:
      return lo, best
  else:
    hi, lo, best = start, None, None
    while lo is None and runs < max_runs:
      rate = hi / 1.5
      if rate < start / 1e3:
        return 0.0, None
      ok, out = passes(rate)
      if ok:
        lo, best = rate, out
      else:
        hi = rate
    if lo is None:
      return 0.0, None
  while hi / lo > 1 + rel_tol and runs < max_runs:
    mid = math.sqrt(lo * hi)
    ok, out = passes(mid)
    if ok:
      lo, best = mid, out
    else:
      hi = mid
  return lo, best


@dataclasses.dataclass
class Planned:
  candidate: Candidate
  screened_per_device: float
  goodput: float = 0.0  # req/s of all replicas
  metrics: dict | None = None
  flags: dict | None = None  # measured configurations: the engine flags that run it
  roofline: analytic.Roofline | None = None  # of all replicas
  sustained: bool = True  # False: the run at the goodput was cut at Sustain.max_requests

  @property
  def goodput_per_device(self) -> float:
    return self.goodput / self.candidate.devices

  @property
  def above_roofline(self) -> bool:
    """Whether the goodput or a measured throughput passes the roofline (a model error)."""
    if self.roofline is None:
      return False
    rate = self.roofline.request_rate * (1 + 1e-9)
    out = self.goodput > rate
    if self.metrics:
      replicas = self.candidate.replicas
      out |= self.metrics["request_throughput"] * replicas > rate
      out |= (self.metrics["output_throughput"] * replicas
              > self.roofline.output_tokens_per_s * (1 + 1e-9))
    return bool(out)

  def to_json(self) -> dict:
    out = self.candidate.to_json()
    out.update(goodput=self.goodput, goodput_per_device=self.goodput_per_device,
               screened_goodput_per_device=self.screened_per_device, sustained=self.sustained)
    if self.flags:
      out["flags"] = self.flags
    if self.roofline is not None:
      out.update(roofline_request_rate=self.roofline.request_rate,
                 roofline_bound=self.roofline.bound,
                 roofline_fraction=self.goodput / max(self.roofline.request_rate, 1e-30),
                 above_roofline=self.above_roofline)
    if self.metrics:
      devices = self.candidate.devices
      out.update(output_tokens_per_s_per_device=self.metrics["output_throughput"]
                 * self.candidate.replicas / devices,
                 tokens_per_s_per_user=1e3 / max(self.metrics["median_tpot_ms"], 1e-9),
                 median_ttft_ms=self.metrics["median_ttft_ms"],
                 p90_ttft_ms=self.metrics["p90_ttft_ms"],
                 median_tpot_ms=self.metrics["median_tpot_ms"],
                 p90_tpot_ms=self.metrics["p90_tpot_ms"],
                 slo_attainment=self.metrics["slo_attainment"],
                 simulated_requests=self.metrics.get("simulated_requests"),
                 scored_requests=self.metrics.get("scored_requests"),
                 arrival_window_s=self.metrics.get("arrival_window_s"))
    return out


def _shape(c: Candidate) -> tuple:
  """What the simulated set should span: the meshes and worker counts, and (colocated) the chunk
  size, which decides how a long prompt shares the steps with decode."""
  return (c.mode, c.prefill_tp, c.decode_tp, c.num_prefill_workers, c.num_decode_workers,
          c.chunk_size)


def _unit_key(c: Candidate) -> Candidate:
  return dataclasses.replace(c, replicas=1, num_prefill_workers=min(c.num_prefill_workers, 1),
                             num_decode_workers=min(c.num_decode_workers, 1))


def plan(cfg: ModelConfig, hw: analytic.Hardware, num_devices: int, workload: Workload, *,
         simulate_top: int = 12, per_shape: int = 1, max_seq_len: int | None = None,
         modes: Sequence[str] = ("colocated", "disagg"),
         prefill_hw: analytic.Hardware | None = None,
         sustain: Sustain = SUSTAIN, layers_per_group: int | None = None,
         across_hosts: bool = False) -> tuple[list[Planned], int]:
  """(simulated configurations best first, number of configurations screened). `hw` runs decode
  (and colocated engines); `prefill_hw`, when another kind, runs prefill (disaggregated only).
  Disaggregated units move KV in groups of `layers_per_group` layers (None: per request), over
  the network when `across_hosts`."""
  max_seq_len = max_seq_len or workload.max_seq_len
  hetero = prefill_hw is not None and prefill_hw.name != hw.name
  if hetero:
    modes = tuple(m for m in modes if m == "disagg")
  candidates = [c for c in enumerate_candidates(cfg, hw, num_devices, max_seq_len, prefill_hw)
                if c.mode in modes]
  if not candidates:
    raise ValueError(f"{cfg.num_params() / 1e9:.1f}B parameters leave no room for one "
                     f"{max_seq_len}-token sequence on {num_devices} x {hw.name} "
                     f"({hw.hbm_bytes / 1e9:.0f} GB each) with TP up to {max(TP_CHOICES)}")
  profiles, rooflines = {}, {}
  screened = []
  for c in candidates:
    key = _unit_key(c)
    if key not in profiles:
      profiles[key] = unit_profile(c, cfg, hw, max_seq_len, prefill_hw,
                                   int(np.mean(workload.prompt_lens)), layers_per_group,
                                   across_hosts)
    shape = dataclasses.replace(key, decode_batch=0, prefill_batch=0, chunk_size=0,
                                chunk_batch=0, num_prefill_workers=c.num_prefill_workers,
                                num_decode_workers=c.num_decode_workers)
    if shape not in rooflines:
      rooflines[shape] = unit_roofline(c, cfg, hw, workload, prefill_hw)
    estimate = min(screen(c, profiles[key], workload), rooflines[shape].request_rate)
    screened.append(Planned(c, estimate * c.replicas / c.devices))
    screened[-1].roofline = rooflines[shape]
  # Ties (a phase that the other one bounds) go to the largest decode batch: a limit the screen
  # does not need still bounds how many prefilled requests may wait for decode.
  screened.sort(key=lambda p: (-p.screened_per_device, -p.candidate.decode_batch))
  # The best of each mode gets simulated, whatever the screen says of the other mode; at most
  # `per_shape` configurations of one mesh shape, so the simulated set spans the shapes.
  chosen = []
  for mode in modes:
    taken: dict[tuple, int] = {}
    quota = max(simulate_top // len(modes), 1)
    for p in screened:
      if p.candidate.mode != mode or taken.get(_shape(p.candidate), 0) >= per_shape:
        continue
      taken[_shape(p.candidate)] = taken.get(_shape(p.candidate), 0) + 1
      chosen.append(p)
      if sum(taken.values()) >= quota:
        break
  for p in chosen:
    c, unit = p.candidate, p.roofline
    unit_rate, out = goodput(c, profiles[_unit_key(c)], workload,
                             p.screened_per_device * c.devices / c.replicas,
                             ceiling=unit.request_rate, sustain=sustain)
    p.goodput, p.metrics = unit_rate * c.replicas, out
    p.sustained = bool(out is None or out.get("sustained", True))
    p.roofline = dataclasses.replace(unit, request_rate=unit.request_rate * c.replicas,
                                     output_tokens_per_s=unit.output_tokens_per_s * c.replicas,
                                     limits={k: v * c.replicas for k, v in unit.limits.items()})
  chosen.sort(key=lambda p: -p.goodput_per_device)
  return chosen, len(candidates)


# ---------------------------------------------------------------- measured configurations


def _device_count(spec) -> int:
  return len([d for d in str(spec).split(",") if d.strip()]) if "," in str(spec) else int(spec)


def profile_candidates(profiles: Sequence[StepProfile]
                       ) -> list[tuple[Candidate, StepProfile, dict]]:
  """The configurations that measured step-time tables cover: each profiled engine (its flags in
  `meta["flags"]`, as launch/profile.py records them) with every smaller chunk size and chunk
  batch (colocated) or prefill batch (disaggregated) of its buckets. Returns (candidate, its
  table, the engine flags that run it)."""
  out = []
  for i, profile in enumerate(profiles):
    flags = profile.meta.get("flags")
    if not flags:
      raise ValueError(f"profile {i} has no engine flags (meta.flags): measure it with "
                       "launch/profile.py")
    if profile.mode == "colocated":
      devices = _device_count(flags["devices"])
      tp = flags["tp"] or devices
      for chunk_batch in buckets.chunk_rows(profile.chunk_batch):
        for chunk in buckets.chunk_lens(profile.chunk_size):
          c = Candidate("colocated", tp, tp, 0, 0, 1, profile.decode_batch, chunk_size=chunk,
                        chunk_batch=chunk_batch, decode_dp=devices // tp)
          out.append((c, profile.restricted(chunk_size=chunk, chunk_batch=chunk_batch),
                      {**flags, "config.engine.chunk_size": chunk,
                       "config.engine.chunk_batch": chunk_batch}))
    else:
      pdev, ddev = _device_count(flags["prefill_devices"]), _device_count(flags["decode_devices"])
      ptp, dtp = flags["prefill_tp"] or pdev, flags["decode_tp"] or ddev
      for prefill_batch in buckets.batch_buckets(profile.prefill_batch):
        c = Candidate("disagg", ptp, dtp, 1, 1, 1, profile.decode_batch,
                      prefill_batch=prefill_batch, prefill_dp=pdev // ptp,
                      decode_dp=ddev // dtp)
        out.append((c, profile.restricted(prefill_batch=prefill_batch),
                    {**flags, "config.engine.prefill_batch": prefill_batch}))
  return out


def plan_profiles(profiles: Sequence[StepProfile], workload: Workload, *,
                  modes: Sequence[str] = ("colocated", "disagg"),
                  sustain: Sustain = SUSTAIN) -> tuple[list[Planned], int]:
  """Every configuration the measured tables cover, simulated at a goodput search; best
  first by goodput per device. Returns (ranked, number of configurations)."""
  chosen = []
  for c, profile, flags in profile_candidates(profiles):
    if c.mode not in modes:
      continue
    estimate = screen(c, profile, workload)
    p = Planned(c, estimate / c.devices, flags=flags)
    p.goodput, p.metrics = goodput(c, profile, workload, estimate, sustain=sustain)
    chosen.append(p)
  chosen.sort(key=lambda p: -p.goodput_per_device)
  return chosen, len(chosen)
