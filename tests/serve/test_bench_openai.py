"""benchmark's OpenAI backend against this server reproduces the in-process measurements."""

from disagg_jax.bench import arrivals, metrics, openai_client, runner, workloads


def test_openai_backend_matches_inprocess(live_server):
  requests = workloads.build("random", num_prompts=24, vocab_size=384, tokenizer=None, seed=3,
                             input_len=30, output_len=12, range_ratio=0.5, first_id=8)
  times = arrivals.arrival_times(len(requests), 12.0, seed=3)
  http_records, http_duration = openai_client.run(live_server["url"], requests, times,
                                                  progress=False)
  local_records, local_duration = runner.run(live_server["engine"], requests, times,
                                             progress=False)
  http = metrics.compute(http_records, http_duration)
  local = metrics.compute(local_records, local_duration)
  assert http["completed"] == local["completed"] == 24
  assert http["total_output_tokens"] == local["total_output_tokens"]
  assert [r.output_len for r in http_records] == [r.output_len for r in local_records]
  assert http["mean_transfer_ms"] == local["mean_transfer_ms"] == 0.0  # colocated
  assert http["mean_prefill_ms"] > 0  # phases reported by the server reach the client
  # Same arrivals, same engine: throughput within noise; latencies differ by what HTTP and SSE
  # add (a few ms per request and up to ~1.5 ms per chunk on two busy cores, as much as this
  # tiny model needs per token; with the demo model they agree within noise, see
  # docs/BENCHMARKS.md). The bounds only catch a broken path (a lost stream, a stall): the
  # TTFT difference measured 6-17 ms over repeated runs on this VM, and up to 66 ms (TPOT up to
  # 4.2x) on 2026-12-01, when the same VM ran everything ~1.6x slower.
  assert abs(http["request_throughput"] / local["request_throughput"] - 1) < 0.1
  assert 0.8 < http["mean_tpot_ms"] / local["mean_tpot_ms"] < 10.0
  assert 0 < http["mean_ttft_ms"] - local["mean_ttft_ms"] < 250
