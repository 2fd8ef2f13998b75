"""Goodput-optimal configurations: enumerate, screen analytically, simulate the best.

Goodput follows DistServe: the highest request rate at which at least 90% of requests meet every
SLO; the planner ranks configurations by goodput per device. Every configuration of the space
(mode; TP per phase; prefill and decode workers; decode batch; prefill batch or chunk size) is
first screened with a closed-form capacity estimate (the rate each phase can sustain within the
SLOs), then the `simulate_top` best are simulated with the engine's own policies
(disagg_jax/sim/simulator.py) at a bisection over rates. Independent replicas of a unit (a
colocated engine, or an xPyD group) share the load evenly, so a unit is simulated at rate /
replicas.
"""

from __future__ import annotations

import dataclasses
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
CHUNK_SIZES = (128, 256, 512, 1024, 2048, 4096)
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
  prompt_lens: np.ndarray
  output_lens: np.ndarray
  slos: dict[str, float]
  burstiness: float = 1.0
  seed: int = 0

  @property
  def max_seq_len(self) -> int:
    return int(max(self.prompt_lens + self.output_lens))


def _tp_ok(cfg: ModelConfig, tp: int) -> bool:
  return cfg.num_kv_heads % tp == 0 or tp % cfg.num_kv_heads == 0


def enumerate_candidates(cfg: ModelConfig, hw: analytic.Hardware, num_devices: int,
                         max_seq_len: int) -> list[Candidate]:
  out = []
  tps = [t for t in TP_CHOICES if t <= num_devices and _tp_ok(cfg, t)]
  fits = {t: analytic.fits(cfg, hw, t, 1, max_seq_len)[0] for t in tps}
  for tp, batch, chunk, chunk_batch in itertools.product(tps, DECODE_BATCHES, CHUNK_SIZES,
                                                         CHUNK_BATCHES):
    if fits[tp] and chunk <= max(max_seq_len, CHUNK_SIZES[0]):
      out.append(Candidate("colocated", tp, tp, 0, 0, num_devices // tp, batch,
                           chunk_size=chunk, chunk_batch=chunk_batch))
  for ptp, dtp in itertools.product(tps, tps):
    if not (fits[ptp] and fits[dtp]):
      continue
    for x in range(1, num_devices // ptp + 1):
      for y in range(1, (num_devices - x * ptp) // dtp + 1):
        unit = x * ptp + y * dtp
        for batch, prefill_batch in itertools.product(DECODE_BATCHES, PREFILL_BATCHES):
          out.append(Candidate("disagg", ptp, dtp, x, y, num_devices // unit, batch,
                               prefill_batch=prefill_batch))
  return out


def unit_profile(c: Candidate, cfg: ModelConfig, hw: analytic.Hardware, max_seq_len: int):
  if c.mode == "colocated":
    return analytic.profile_for(cfg, hw, mode="colocated", tp=c.decode_tp,
                                decode_batch=c.decode_batch, max_seq_len=max_seq_len,
                                chunk_size=c.chunk_size, chunk_batch=c.chunk_batch)
  return analytic.profile_for(cfg, hw, mode="disagg", tp=c.decode_tp, prefill_tp=c.prefill_tp,
                              decode_batch=c.decode_batch, max_seq_len=max_seq_len,
                              prefill_batch=c.prefill_batch)


def screen(c: Candidate, profile, workload: Workload) -> float:
  """A closed-form upper estimate of the unit's goodput (req/s): the rate its prefill and its
  decode can each sustain, with the decode batch cut to what the TPOT SLO allows."""
  prompt, output = float(np.mean(workload.prompt_lens)), float(np.mean(workload.output_lens))
  tpot_slo = workload.slos.get("tpot", math.inf)
  ctx = prompt + output / 2
  batch = min(c.decode_batch, profile.num_pages * profile.page_size // max(int(ctx), 1))
  while batch > 1 and profile.decode_time(batch, int(batch * ctx)) > tpot_slo:
    batch //= 2
  step = profile.decode_time(batch, int(batch * ctx))
  if step > tpot_slo:
    return 0.0
  bucket = next(s for s in (profile.length_buckets or (2 ** math.ceil(math.log2(prompt)),))
                if s >= prompt) if profile.mode == "disagg" else None
  if profile.mode == "disagg":
    per_request = profile.prefill(1, bucket)
    prefill_rate = c.num_prefill_workers / per_request
    decode_rate = c.num_decode_workers * batch / (output * step)
    return min(prefill_rate, decode_rate)
  # colocated: each request needs ceil(prompt / chunk) chunk slots, chunk_batch per step, and
  # `output` decode steps shared by `batch` sequences; mixed steps cost the chunk time.
  chunk_step = profile.mixed(1, min(c.chunk_size, 2 ** math.ceil(math.log2(max(prompt, 16)))))
  chunks = math.ceil(prompt / c.chunk_size) / c.chunk_batch
  return 1.0 / (chunks * chunk_step + output * step / batch)


def attainment(c: Candidate, profile, workload: Workload, rate: float) -> tuple[float, dict]:
  arrivals = arrivals_lib.arrival_times(len(workload.prompt_lens), rate, workload.burstiness,
                                        workload.seed)
  result = simulator.simulate(profile, workload.prompt_lens, workload.output_lens, arrivals,
                              num_prefill_workers=c.num_prefill_workers or 1,
                              num_decode_workers=c.num_decode_workers or 1)
  out = metrics.compute(result.records, result.duration, workload.slos)
  return out["slo_attainment"], out


def goodput(c: Candidate, profile, workload: Workload, estimate: float,
            steps: int = 7) -> tuple[float, dict | None]:
  """The highest unit rate with >= 90% SLO attainment, by bisection below 2 x the estimate (the
  bracket doubles while its top still meets the SLOs, up to 16 x the estimate)."""
  lo, hi, best = 0.0, max(2.0 * estimate, 1e-3), None
  for _ in range(4):
    ok, out = attainment(c, profile, workload, hi)
    if ok < ATTAINMENT:
      break
    lo, best, hi = hi, out, 2 * hi
  else:
    return lo, best
  for _ in range(steps):
    mid = (lo + hi) / 2
    ok, out = attainment(c, profile, workload, mid)
    if ok >= ATTAINMENT:
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

  @property
  def goodput_per_device(self) -> float:
    return self.goodput / self.candidate.devices

  def to_json(self) -> dict:
    out = self.candidate.to_json()
    out.update(goodput=self.goodput, goodput_per_device=self.goodput_per_device,
               screened_goodput_per_device=self.screened_per_device)
    if self.flags:
      out["flags"] = self.flags
    if self.metrics:
      devices = self.candidate.devices
      out.update(output_tokens_per_s_per_device=self.metrics["output_throughput"]
                 * self.candidate.replicas / devices,
                 tokens_per_s_per_user=1e3 / max(self.metrics["median_tpot_ms"], 1e-9),
                 median_ttft_ms=self.metrics["median_ttft_ms"],
                 p90_ttft_ms=self.metrics["p90_ttft_ms"],
                 median_tpot_ms=self.metrics["median_tpot_ms"],
                 p90_tpot_ms=self.metrics["p90_tpot_ms"])
    return out


def plan(cfg: ModelConfig, hw: analytic.Hardware, num_devices: int, workload: Workload, *,
         simulate_top: int = 40, max_seq_len: int | None = None,
         modes: Sequence[str] = ("colocated", "disagg")) -> tuple[list[Planned], int]:
  """(simulated configurations best first, number of configurations screened)."""
  max_seq_len = max_seq_len or workload.max_seq_len
  candidates = [c for c in enumerate_candidates(cfg, hw, num_devices, max_seq_len)
                if c.mode in modes]
  if not candidates:
    raise ValueError(f"{cfg.num_params() / 1e9:.1f}B parameters leave no room for one "
                     f"{max_seq_len}-token sequence on {num_devices} x {hw.name} "
                     f"({hw.hbm_bytes / 1e9:.0f} GB each) with TP up to {max(TP_CHOICES)}")
  profiles = {}
  screened = []
  for c in candidates:
    key = dataclasses.replace(c, replicas=1, num_prefill_workers=min(c.num_prefill_workers, 1),
                              num_decode_workers=min(c.num_decode_workers, 1))
    if key not in profiles:
      profiles[key] = unit_profile(c, cfg, hw, max_seq_len)
    estimate = screen(c, profiles[key], workload)
    screened.append(Planned(c, estimate * c.replicas / c.devices))
  screened.sort(key=lambda p: -p.screened_per_device)
  # The best of each mode gets simulated, whatever the screen says of the other mode.
  chosen = []
  for mode in modes:
    chosen += [p for p in screened if p.candidate.mode == mode][:max(simulate_top // len(modes),
                                                                   1)]
  for p in chosen:
    c = p.candidate
    key = dataclasses.replace(c, replicas=1, num_prefill_workers=min(c.num_prefill_workers, 1),
                              num_decode_workers=min(c.num_decode_workers, 1))
    unit_rate, out = goodput(c, profiles[key], workload,
                             p.screened_per_device * c.devices / c.replicas)
    p.goodput, p.metrics = unit_rate * c.replicas, out
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
                  modes: Sequence[str] = ("colocated", "disagg")) -> tuple[list[Planned], int]:
  """Every configuration the measured tables cover, simulated at a goodput bisection; best
  first by goodput per device. Returns (ranked, number of configurations)."""
  chosen = []
  for c, profile, flags in profile_candidates(profiles):
    if c.mode not in modes:
      continue
    estimate = screen(c, profile, workload)
    p = Planned(c, estimate / c.devices, flags=flags)
    p.goodput, p.metrics = goodput(c, profile, workload, estimate)
    chosen.append(p)
  chosen.sort(key=lambda p: -p.goodput_per_device)
  return chosen, len(chosen)
