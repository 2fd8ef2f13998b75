"""When each request is sent: Poisson, gamma with burstiness, or all at once."""

from __future__ import annotations

import math

import numpy as np

from disagg_jax.bench.workloads import WorkloadError


def arrival_times(num: int, request_rate: float, burstiness: float = 1.0,
                  seed: int = 0) -> np.ndarray:
  """float64[num]: seconds after the start at which each request is sent.

  Gaps follow a gamma distribution with shape `burstiness` and mean 1 / request_rate (burstiness
  1 is a Poisson process; < 1 burstier, > 1 more regular). As vLLM does, the times are rescaled
  so the last one lands at num / request_rate. request_rate = inf sends everything at once.
  """
  if math.isnan(request_rate) or request_rate <= 0:
    raise WorkloadError(f"--request_rate={request_rate} must be positive (inf: all at once)")
  if math.isnan(burstiness) or burstiness <= 0:
    raise WorkloadError(f"--burstiness={burstiness} must be positive")
  if math.isinf(request_rate):
    return np.zeros(num)
  rng = np.random.default_rng(seed)
  gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)
  times = np.cumsum(gaps)
  return times * (num / request_rate) / times[-1]


def conversation_arrivals(requests, request_rate: float,
                          burstiness: float, seed: int) -> tuple[list, np.ndarray]:
  """Arrival times of a shared-prefix workload: conversations start as a (gamma) process at
  `request_rate` / turns per conversation, each turn at its offset after the start. Returns
  the requests and their times, sorted by time."""
  num_conversations = max(r.conversation for r in requests) + 1
  turns = len(requests) / num_conversations
  starts = arrival_times(num_conversations, request_rate / turns, burstiness, seed)
  times = np.array([starts[r.conversation] + r.offset for r in requests])
  order = np.argsort(times, kind="stable")
  return [requests[i] for i in order], times[order]
