"""launch/benchmark.py: the contract's JSON, self-consistent, in both modes; bad input fails fast."""

import json
import os
import subprocess
import sys

import pytest

CONTRACT_KEYS = ["completed", "duration", "request_throughput", "output_throughput",
                 "total_token_throughput", "request_goodput"] + [
    f"{stat}_{metric}_ms" for metric in ("ttft", "tpot", "itl", "e2el")
    for stat in ("mean", "median", "std", "p90", "p99")] + [
    f"{stat}_{phase}_ms" for phase in ("queue", "prefill", "transfer", "decode")
    for stat in ("mean", "p99")]


def run_benchmark(repo_root, *flags):
  return subprocess.run([sys.executable, os.path.join(repo_root, "launch", "benchmark.py"),
                         "--progress=false", *flags], capture_output=True, text=True,
                        timeout=900)


@pytest.mark.parametrize("mode_flags", [
    # colocated: the same runner and JSON (tests/serve/test_bench_openai.py serves it in-process)
    pytest.param(["--mode=colocated", "--devices=2"], marks=pytest.mark.slow),
    ["--mode=disagg", "--prefill_devices=2", "--decode_devices=2"],
])
def test_benchmark_json(mode_flags, hf_checkpoint, tmp_path, repo_root):
  model_dir, _ = hf_checkpoint("llama3")
  out = tmp_path / "result.json"
  result = run_benchmark(repo_root, f"--model_path={model_dir}", "--num_cpu_devices=4",
                         *mode_flags, "--num_prompts=30", "--request_rate=20",
                         "--random_input_len=40", "--random_output_len=8",
                         "--random_range_ratio=0.5", "--goodput=ttft:5000,tpot:1000",
                         "--config.engine.max_seq_len=128", "--config.engine.decode_batch=8",
                         f"--output_json={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads(out.read_text())
  for key in CONTRACT_KEYS:
    assert isinstance(data[key], (int, float)), key
  assert data["completed"] == 30 and data["failed"] == 0
  assert data["request_throughput"] * data["duration"] == pytest.approx(data["completed"])
  assert data["request_goodput"] <= data["request_throughput"]
  assert data["mean_ttft_ms"] <= data["mean_e2el_ms"] and data["p99_ttft_ms"] <= data["p99_e2el_ms"]
  assert data["total_output_tokens"] >= 30
  records = [json.loads(l) for l in (tmp_path / "result.json.requests.jsonl").read_text().splitlines()]
  assert len(records) == 30 and all(r["success"] for r in records)
  assert all(r["ttft"] <= r["e2el"] for r in records)
  if "disagg" in mode_flags[0]:
    assert data["mean_transfer_ms"] > 0
  else:
    assert data["mean_transfer_ms"] == 0
  assert "Mean TTFT (ms):" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--request_rate=0"], "--request_rate=0.0 must be positive"),
    (["--request_rate=-2"], "--request_rate=-2.0 must be positive"),
    (["--dataset_name=sharegpt", "--dataset_path=/nonexistent.json"], "does not exist"),
    (["--dataset_name=sharegpt"], "needs --dataset_path"),
    (["--random_input_len=900"], "max_prefill_length is 512"),
    (["--goodput=speed:3"], "'speed' is not one of"),
    (["--mode=single"], "benchmark --mode=colocated or --mode=disagg"),
])
def test_bad_workloads_fail_before_running(flags, message, hf_checkpoint, repo_root):
  model_dir, _ = hf_checkpoint("llama3")
  result = run_benchmark(repo_root, f"--model_path={model_dir}", "--mode=colocated", *flags)
  assert result.returncode != 0
  assert message in result.stderr
  assert "compiling" not in result.stderr  # failed before any engine was built
