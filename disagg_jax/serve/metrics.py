"""Prometheus metrics in the text exposition format: engine gauges and latency histograms."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)


class Histogram:

  def __init__(self, name: str, help_text: str, buckets=LATENCY_BUCKETS_S):
    self.name, self.help, self.buckets = name, help_text, tuple(buckets)
    self.counts = [0] * (len(self.buckets) + 1)
    self.sum = 0.0
    self.count = 0

  def observe(self, value: float) -> None:
    self.counts[bisect.bisect_left(self.buckets, value)] += 1
    self.sum += value
    self.count += 1

  def render(self) -> list[str]:
    lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
    cumulative = 0
    for bound, n in zip(self.buckets, self.counts):
      cumulative += n
      lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
    lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
    lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
    return lines


class ServerMetrics:
  """Thread-safe: requests finish on the event loop, but stay cheap to render anywhere."""

  PREFIX = "disagg_jax"

  def __init__(self):
    self._lock = threading.Lock()
    p = self.PREFIX
    self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Submission to first token.")
    self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Gap between consecutive tokens.")
    self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Submission to last token.")
    self.phases = {phase: Histogram(f"{p}_request_{phase}_seconds",
                                    f"Time a request spent in the {phase} phase.")
                   for phase in ("queue", "prefill", "transfer", "decode")}
    self.finished = {}  # finish_reason -> count
    self.rejected = 0
    self.prompt_tokens = 0
    self.cached_tokens = 0  # of those, found in the prefix cache

  def observe(self, output) -> None:
    with self._lock:
      reason = output.finish_reason or "unknown"
      self.finished[reason] = self.finished.get(reason, 0) + 1
      m = output.metrics
      self.prompt_tokens += len(output.prompt_token_ids)
      self.cached_tokens += int(getattr(m, "cached_tokens", 0) or 0)
      if m is None or not m.token_times:
        return
      self.ttft.observe(m.token_times[0] - m.arrival)
      for a, b in zip(m.token_times, m.token_times[1:]):
        self.itl.observe(b - a)
      self.e2e.observe(m.token_times[-1] - m.arrival)
      for phase, seconds in m.phases().items():
        self.phases[phase].observe(seconds)

  def render(self, engine_stats: dict, in_flight: int) -> str:
    """`engine_stats` from `EngineAPI.stats`; `in_flight`: the HTTP layer's requests."""
    p = self.PREFIX
    lines = []
    engine_stats = {**engine_stats, "engine_in_flight": engine_stats.get("in_flight", 0),
                    "in_flight": in_flight}
    gauges = {"in_flight": "HTTP requests being served (streaming ones included).",
              "engine_in_flight": "Requests in the engine.",
              "prefill_workers_alive": "Live prefill workers (--cluster=ray).",
              "decode_workers_alive": "Live decode workers (--cluster=ray).",
              "running": "Requests holding a decode slot.",
              "waiting": "Requests waiting for prefill (or a slot, colocated).",
              "transferring": "Prefilled requests whose KV is moving to the decode mesh.",
              "awaiting_slot": "Requests whose KV arrived, waiting for a decode slot.",
              "free_pages": "Free KV pages in the decode page pool (incl. unreferenced cached).",
              "cached_pages": "KV pages in the prefix cache (referenced or not).",
              "total_pages": "KV pages in the decode page pool.",
              "prefill_devices": "Devices on the prefill mesh (--elastic moves them).",
              "decode_devices": "Devices on the decode mesh (--elastic moves them).",
              "split_changes": "Moves of the prefill:decode split so far (--elastic)."}
    for key, help_text in gauges.items():
      if key in engine_stats:
        lines += [f"# HELP {p}_{key} {help_text}", f"# TYPE {p}_{key} gauge",
                  f"{p}_{key} {engine_stats[key]}"]
    if engine_stats.get("total_pages"):
      usage = 1 - engine_stats["free_pages"] / engine_stats["total_pages"]
      lines += [f"# HELP {p}_page_usage Fraction of KV pages in use.",
                f"# TYPE {p}_page_usage gauge", f"{p}_page_usage {usage}"]
    with self._lock:
      lines += [f"# HELP {p}_requests_finished_total Finished requests by reason (aborted "
                "ones, e.g. by a client that left, as abort).",
                f"# TYPE {p}_requests_finished_total counter"]
      lines += [f'{p}_requests_finished_total{{finish_reason="{r}"}} {n}'
                for r, n in sorted(self.finished.items())]
      lines += [f"# HELP {p}_requests_rejected_total Requests refused with 429.",
                f"# TYPE {p}_requests_rejected_total counter",
                f"{p}_requests_rejected_total {self.rejected}"]
      hit_rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
      lines += [f"# HELP {p}_prompt_tokens_total Prompt tokens of finished requests.",
                f"# TYPE {p}_prompt_tokens_total counter",
                f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_cached_prompt_tokens_total Of those, found in the prefix cache.",
                f"# TYPE {p}_cached_prompt_tokens_total counter",
                f"{p}_cached_prompt_tokens_total {self.cached_tokens}",
                f"# HELP {p}_prefix_cache_hit_rate Cached prompt tokens / prompt tokens.",
                f"# TYPE {p}_prefix_cache_hit_rate gauge",
                f"{p}_prefix_cache_hit_rate {hit_rate}"]
      for hist in (self.ttft, self.itl, self.e2e, *self.phases.values()):
        lines += hist.render()
    return "\n".join(lines) + "\n"
