"""Serving metrics with vLLM's definitions, DistServe's SLO attainment, and per-phase times.

  TTFT   submission -> first token;            ITL   gaps between consecutive tokens, pooled;
  decode ITL  ITL without each request's first gap (which, disaggregated, holds the KV
         transfer): the cadence of the decode loop alone — an extension of ours;
  TPOT   (E2EL - TTFT) / (output tokens - 1), per request with more than one token;
  E2EL   submission -> last token;             throughputs over the run's duration;
  goodput  requests per second meeting every given SLO (a one-token request's TPOT counts as 0);
  slo_attainment  fraction of all requests meeting every SLO (failed ones do not).
Per phase: queue, prefill, KV transfer and decode (RequestMetrics.phases), mean and p99.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from disagg_jax.bench.workloads import WorkloadError

LATENCIES = ("ttft", "tpot", "itl", "e2el")
PHASES = ("queue", "prefill", "transfer", "decode")
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


@dataclasses.dataclass
class RequestRecord:
  """One request's outcome, times in seconds."""
  prompt_len: int
  output_len: int = 0
  success: bool = False
  ttft: float = 0.0
  itl: list[float] = dataclasses.field(default_factory=list)
  e2el: float = 0.0
  phases: dict[str, float] = dataclasses.field(default_factory=dict)
  error: str | None = None
  output_token_ids: list[int] | None = None  # kept when the backend reports them
  # Disaggregated: the whole KV transfer, first copy starting to last landing (the "transfer"
  # phase is only its part after the first token, the exposed transfer).
  transfer_total: float | None = None
  cached_tokens: int = 0  # prompt tokens whose KV was found in the prefix cache
  arrival: float | None = None  # when it was sent, seconds from the run's start

  @property
  def tpot(self) -> float | None:
    if self.output_len <= 1:
      return None
    return (self.e2el - self.ttft) / (self.output_len - 1)

  @classmethod
  def from_output(cls, output, prompt_len: int) -> "RequestRecord":
    """From an engine RequestOutput (its metrics hold the timeline)."""
    m = output.metrics
    if output.error is not None or m is None or not m.token_times:
      return cls(prompt_len, error=output.error or f"finished with {output.finish_reason}")
    times = m.token_times
    return cls(prompt_len, len(output.output_token_ids), True, times[0] - m.arrival,
               [float(g) for g in np.diff(times)], times[-1] - m.arrival, m.phases(),
               output_token_ids=list(output.output_token_ids),
               transfer_total=m.transfer_total(), cached_tokens=m.cached_tokens)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["tpot"] = self.tpot
    return out


def parse_goodput(spec: str | None) -> dict[str, float]:
  """"ttft:200,tpot:50" -> {"ttft": 0.2, "tpot": 0.05} (seconds)."""
  if not spec:
    return {}
  slos = {}
  for item in spec.replace(" ", ",").split(","):
    if not item:
      continue
    name, _, value = item.partition(":")
    if name not in GOODPUT_KEYS:
      raise WorkloadError(f"--goodput key {name!r} is not one of {', '.join(GOODPUT_KEYS)}")
    try:
      ms = float(value)
    except ValueError:
      raise WorkloadError(f"--goodput {name}:{value!r} needs a number of milliseconds") from None
    if not ms > 0:
      raise WorkloadError(f"--goodput {name}:{value} must be a positive number of milliseconds")
    slos[name] = ms / 1e3
  return slos


def meets_slos(record: RequestRecord, slos: dict[str, float]) -> bool:
  if not record.success:
    return False
  values = {"ttft": record.ttft, "tpot": record.tpot or 0.0, "e2el": record.e2el}
  return all(values[k] <= v for k, v in slos.items())


def _stats(prefix: str, values_s) -> dict[str, float]:
  values = np.asarray(values_s, np.float64) * 1e3 if len(values_s) else np.zeros(1)
  return {f"mean_{prefix}_ms": float(np.mean(values)),
          f"median_{prefix}_ms": float(np.median(values)),
          f"std_{prefix}_ms": float(np.std(values)),
          f"p90_{prefix}_ms": float(np.percentile(values, 90)),
          f"p99_{prefix}_ms": float(np.percentile(values, 99))}


def compute(records: list[RequestRecord], duration: float,
            slos: dict[str, float] | None = None) -> dict:
  """The benchmark JSON (vLLM's keys plus the per-phase breakdown) for one run."""
  if duration <= 0:
    raise ValueError(f"duration must be positive, got {duration}")
  done = [r for r in records if r.success]
  total_in = sum(r.prompt_len for r in done)
  total_out = sum(r.output_len for r in done)
  good = sum(meets_slos(r, slos) for r in records) if slos else None
  out = {
      "completed": len(done),
      "failed": len(records) - len(done),
      "duration": duration,
      "total_input_tokens": total_in,
      "total_output_tokens": total_out,
      "request_throughput": len(done) / duration,
      "output_throughput": total_out / duration,
      "total_token_throughput": (total_in + total_out) / duration,
      "request_goodput": good / duration if slos else None,
      "slo_attainment": good / len(records) if slos and records else None,
  }
  out.update(_stats("ttft", [r.ttft for r in done]))
  out.update(_stats("tpot", [r.tpot for r in done if r.tpot is not None]))
  out.update(_stats("itl", [gap for r in done for gap in r.itl]))
  out.update(_stats("decode_itl", [gap for r in done for gap in r.itl[1:]]))
  out.update(_stats("e2el", [r.e2el for r in done]))
  for phase in PHASES:
    values = np.asarray([r.phases.get(phase, 0.0) for r in done] or [0.0]) * 1e3
    out[f"mean_{phase}_ms"] = float(np.mean(values))
    out[f"p99_{phase}_ms"] = float(np.percentile(values, 99))
  totals = np.asarray([r.transfer_total for r in done if r.transfer_total is not None] or [0.0])
  out["mean_transfer_total_ms"] = float(np.mean(totals)) * 1e3
  out["p99_transfer_total_ms"] = float(np.percentile(totals, 99)) * 1e3
  # Prefix caching: the share of prompt tokens found cached, and per request what was cached
  # and what the prefill computed.
  cached = sum(r.cached_tokens for r in done)
  out["prefix_cache_hit_rate"] = cached / total_in if total_in else 0.0
  out["mean_cached_prompt_tokens"] = cached / len(done) if done else 0.0
  out["mean_computed_prompt_tokens"] = (total_in - cached) / len(done) if done else 0.0
  return out


def steady_state(records: list[RequestRecord], arrivals, warmup: float
                 ) -> tuple[list[RequestRecord], float]:
  """The records of a sustained run that count: those of requests arriving after the first
  `warmup` fraction of the arrival window (the system starts empty, so early requests see
  less load than the rate brings), and the seconds from the first of them arriving to the last of
  them finishing (the duration of `compute`). `records[i]` is the request that arrived at
  `arrivals[i]`."""
  arrivals = np.asarray(arrivals, np.float64)
  if len(records) != len(arrivals):
    raise ValueError(f"{len(records)} records for {len(arrivals)} arrivals")
  if not 0 <= warmup < 1:
    raise ValueError(f"warm-up fraction {warmup} must be in [0, 1)")
  start = arrivals.min() + warmup * (arrivals.max() - arrivals.min())
  keep = [i for i in range(len(records)) if arrivals[i] >= start]
  ends = [arrivals[i] + records[i].e2el for i in keep if records[i].success]
  first = arrivals[keep].min()
  return [records[i] for i in keep], float(max(max(ends, default=first) - first, 1e-9))


def in_system(records: list[RequestRecord], arrivals, times) -> list[int]:
  """How many requests are in the system (arrived, last token not yet out; failed ones until
  their arrival only) at each of `times`."""
  arrivals = np.asarray(arrivals, np.float64)
  ends = arrivals + np.array([r.e2el if r.success else 0.0 for r in records])
  return [int(np.sum((arrivals <= t) & (ends > t))) for t in times]
