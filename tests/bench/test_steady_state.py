"""The sustained-run helpers of bench/metrics.py: warm-up exclusion and requests in the system."""

import pytest

from disagg_jax.bench import metrics
from disagg_jax.bench.metrics import RequestRecord


def _record(e2el, ok=True):
  return RequestRecord(10, 4, ok, 0.1, [0.1, 0.1, 0.1], e2el)


def test_steady_state_drops_the_warmup():
  arrivals = [0.0, 1.0, 2.0, 3.0, 4.0]
  records = [_record(1.5) for _ in arrivals]
  kept, duration = metrics.steady_state(records, arrivals, warmup=0.5)
  assert kept == records[2:]  # arrivals at or after 0 + 0.5 x 4 s
  assert duration == pytest.approx(4.0 + 1.5 - 2.0)  # first kept arrival to last kept finish
  assert metrics.steady_state(records, arrivals, 0.0)[0] == records
  with pytest.raises(ValueError, match="5 records for 4 arrivals"):
    metrics.steady_state(records, arrivals[:4], 0.5)
  with pytest.raises(ValueError, match="warm-up fraction 1.0"):
    metrics.steady_state(records, arrivals, 1.0)


def test_in_system_counts_arrived_and_unfinished():
  arrivals = [0.0, 1.0, 2.0]
  records = [_record(5.0), _record(0.5), _record(1.0, ok=False)]
  assert metrics.in_system(records, arrivals, [0.5, 1.2, 1.6, 2.5, 5.5]) == [1, 2, 1, 1, 0]
