"""Every metric against timelines computed by hand."""

import pytest

from disagg_jax.bench.metrics import RequestRecord, compute, parse_goodput
from disagg_jax.bench.workloads import WorkloadError
from disagg_jax.engine.request import RequestOutput
from disagg_jax.engine.state import RequestMetrics


def output(arrival, token_times, prompt=3, first=None, transfer=None):
  """An engine output: submitted at `arrival`, tokens at `token_times` (seconds)."""
  m = RequestMetrics(arrival=arrival, prefill_start=arrival + 0.5,
                     first_token=token_times[0] if first is None else first,
                     finished=token_times[-1], token_times=list(token_times))
  if transfer:
    m.transfer_start, m.transfer_end = transfer
  return RequestOutput("r", [1] * prompt, [7] * len(token_times), "length", metrics=m)


def test_hand_computed_timelines():
  # A: sent at 0, tokens at 1, 2, 4 -> TTFT 1, ITL [1, 2], TPOT (4 - 1) / 2 = 1.5, E2EL 4.
  # B: sent at 1, one token at 3 -> TTFT 2, no ITL, no TPOT, E2EL 2.
  # C: failed.
  a = RequestRecord.from_output(output(0.0, [1.0, 2.0, 4.0], prompt=10,
                                       transfer=(1.0, 1.25)), 10)
  b = RequestRecord.from_output(output(1.0, [3.0], prompt=5), 5)
  c = RequestRecord(prompt_len=4, error="boom")
  assert (a.ttft, a.itl, a.tpot, a.e2el) == (1.0, [1.0, 2.0], 1.5, 4.0)
  assert (b.ttft, b.itl, b.tpot, b.e2el) == (2.0, [], None, 2.0)
  assert a.phases == {"queue": 0.5, "prefill": 0.5, "transfer": 0.25, "decode": 2.75}
  result = compute([a, b, c], duration=8.0, slos=parse_goodput("ttft:1500,tpot:2000"))
  assert result["completed"] == 2 and result["failed"] == 1
  assert result["total_input_tokens"] == 15 and result["total_output_tokens"] == 4
  assert result["request_throughput"] == 2 / 8
  assert result["output_throughput"] == 4 / 8
  assert result["total_token_throughput"] == 19 / 8
  assert result["mean_ttft_ms"] == pytest.approx(1500.0)
  assert result["median_ttft_ms"] == pytest.approx(1500.0)
  assert result["std_ttft_ms"] == pytest.approx(500.0)
  assert result["p99_ttft_ms"] == pytest.approx(1000 + 0.99 * 1000)
  assert result["mean_tpot_ms"] == pytest.approx(1500.0)  # only A has a TPOT
  assert result["mean_itl_ms"] == pytest.approx(1500.0)  # pooled [1, 2]
  assert result["p90_itl_ms"] == pytest.approx(1900.0)
  assert result["mean_e2el_ms"] == pytest.approx(3000.0)
  # Goodput: A's TTFT 1 s meets 1.5 s, TPOT 1.5 s meets 2 s; B's TTFT 2 s misses. C failed.
  assert result["request_goodput"] == pytest.approx(1 / 8)
  assert result["slo_attainment"] == pytest.approx(1 / 3)
  assert result["mean_transfer_ms"] == pytest.approx(125.0)  # A 250 ms, B 0 (colocated)
  assert result["prefix_cache_hit_rate"] == 0.0
  a.cached_tokens = 6  # of A's 10 prompt tokens; B's 5 all computed
  cached = compute([a, b, c], duration=8.0)
  assert cached["prefix_cache_hit_rate"] == pytest.approx(6 / 15)
  assert cached["mean_cached_prompt_tokens"] == pytest.approx(3.0)
  assert cached["mean_computed_prompt_tokens"] == pytest.approx(4.5)
  assert result["request_goodput"] <= result["request_throughput"]


def test_single_token_request_counts_tpot_as_zero_for_goodput():
  only = RequestRecord.from_output(output(0.0, [0.1]), 3)
  result = compute([only], 1.0, parse_goodput("tpot:1"))
  assert result["request_goodput"] == 1.0 and result["mean_tpot_ms"] == 0.0


def test_nothing_meets_the_slo():
  records = [RequestRecord.from_output(output(0.0, [2.0, 3.0]), 3) for _ in range(4)]
  result = compute(records, 10.0, parse_goodput("ttft:100"))
  assert result["request_goodput"] == 0.0 and result["slo_attainment"] == 0.0
  assert result["request_throughput"] == 0.4
  assert compute(records, 10.0)["request_goodput"] is None


@pytest.mark.parametrize("spec, message", [
    ("latency:5", "'latency' is not one of ttft, tpot, e2el"),
    ("ttft:fast", "needs a number of milliseconds"),
    ("ttft:-3", "must be a positive number"),
])
def test_bad_goodput_specs(spec, message):
  with pytest.raises(WorkloadError, match=message):
    parse_goodput(spec)
