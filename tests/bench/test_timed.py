"""Workloads with their own arrival times: shifting phases and trace replay."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from disagg_jax.bench import timed
from disagg_jax.bench.workloads import WorkloadError


def test_phases_parse_and_bad_ones_are_named():
  assert timed.parse_phases("prefill_heavy:20,decode_heavy:10:8") == [
      timed.Phase("prefill_heavy", 20.0), timed.Phase("decode_heavy", 10.0, 8.0)]
  for spec, message in (("prefill_heavy", "is not name:seconds"),
                        ("sharegpt:10", "'sharegpt' is not one of"),
                        ("random:ten", "not a number"), ("random:10:-1", "must be positive")):
    with pytest.raises(WorkloadError, match=message):
      timed.parse_phases(spec)


def test_shifting_phases_change_the_mix_at_their_boundaries():
  phases = timed.parse_phases("prefill_heavy:30:6,decode_heavy:30")
  requests, times = timed.shifting(phases, request_rate=3.0, burstiness=1.0, vocab_size=300,
                                   seed=2, first_id=3)
  first = [r for r, t in zip(requests, times) if t < 30]
  second = [r for r, t in zip(requests, times) if t >= 30]
  assert list(times) == sorted(times) and times[-1] < 60
  assert abs(len(first) - 180) < 45 and abs(len(second) - 90) < 30  # each phase's rate
  assert np.mean([len(r.prompt_token_ids) for r in first]) > 250  # prefill_heavy: 384 +-25%
  assert np.mean([len(r.prompt_token_ids) for r in second]) < 50  # decode_heavy: 32 +-25%
  assert np.mean([r.output_len for r in second]) > 100 > np.mean([r.output_len for r in first])
  assert all(3 <= t < 300 for r in requests for t in r.prompt_token_ids)
  again, times_again = timed.shifting(phases, request_rate=3.0, burstiness=1.0, vocab_size=300,
                                      seed=2, first_id=3)
  assert again == requests and (times_again == times).all()  # seeded
  with pytest.raises(WorkloadError, match="must be positive and finite"):
    timed.shifting(timed.parse_phases("random:10"), request_rate=float("inf"), burstiness=1.0,
                   vocab_size=300, seed=0)


def test_traces_in_csv_and_jsonl(tmp_path):
  azure = tmp_path / "azure.csv"
  azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                   "2023-11-16 18:15:46.6805900,374,44\n"
                   "2023-11-16 18:15:50.9951690,396,109\n"
                   "2023-11-16 18:15:45.1000000,879,31\n")
  times, ins, outs = timed.read_trace(str(azure))
  assert times == pytest.approx([0.0, 1.58059, 5.895169]) and list(ins) == [879, 374, 396]
  assert list(outs) == [31, 44, 109]
  jsonl = tmp_path / "t.jsonl"
  jsonl.write_text('{"arrival_time": 1.5, "input_len": 10, "output_len": 3}\n\n'
                   '{"arrival_time": 0.5, "input_len": 20, "output_len": 4}\n')
  times, ins, outs = timed.read_trace(str(jsonl))
  assert list(times) == [0.0, 1.0] and list(ins) == [20, 10] and list(outs) == [4, 3]
  requests, arrivals = timed.trace(str(jsonl), num=1, vocab_size=50, seed=0)
  assert len(requests) == 1 and len(requests[0].prompt_token_ids) == 20 and list(arrivals) == [0]
  bad = tmp_path / "bad.csv"
  for text, message in (("time,input_len\n1,2\n", r"bad.csv:2: no output length column"),
                        ("time,input_len,output_len\n1,x,2\n", "input length 'x' is not a number"),
                        ("time,input_len,output_len\nnoon,3,2\n", "neither seconds nor a date"),
                        ("time,input_len,output_len\n", "has no requests")):
    bad.write_text(text)
    with pytest.raises(WorkloadError, match=message):
      timed.read_trace(str(bad))
  with pytest.raises(WorkloadError, match="needs --dataset_path"):
    timed.read_trace(None)


def test_the_shipped_sample_trace_is_the_generated_one(tmp_path, repo_root):
  fresh = tmp_path / "sample.csv"
  timed.write_trace(str(fresh), *timed.sample_trace())
  shipped = os.path.join(repo_root, "configs", "traces", "sample.csv")
  assert fresh.read_text() == open(shipped).read()
  times, ins, outs = timed.read_trace(shipped)
  assert len(times) == 120 and (ins + outs).max() <= 480  # fits the demo model's 512 tokens
  # The mix drifts from long prompts to long answers.
  assert ins[:40].mean() > 3 * ins[-40:].mean() and outs[-40:].mean() > 3 * outs[:40].mean()


def _run(repo_root, script, *flags):
  return subprocess.run([sys.executable, os.path.join(repo_root, "launch", script), *flags],
                        capture_output=True, text=True, timeout=600)


def test_simulate_replays_the_sample_trace_and_shifting_phases(tmp_path, repo_root):
  out = tmp_path / "sim.json"
  model = ["--hardware=h100", "--model_config=llama3_8b", "--mode=colocated"]
  done = _run(repo_root, "simulate.py", *model, "--dataset_name=trace", "--dataset_path="
              + os.path.join(repo_root, "configs", "traces", "sample.csv"), f"--output_json={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["completed"] == result["num_prompts"] == 120
  assert 60 < result["duration"] < 80  # the trace's 67 s, replayed as recorded
  done = _run(repo_root, "simulate.py", *model, "--dataset_name=shifting",
              "--shifting_phases=4k_256:10:2,1k_1k:10:4", "--config.engine.max_seq_len=8192",
              f"--output_json={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["workload_phases"] == [["4k_256", 0.0, 10.0], ["1k_1k", 10.0, 20.0]]
  assert result["completed"] == result["num_prompts"] > 40
  done = _run(repo_root, "simulate.py", *model, "--dataset_name=trace")
  assert done.returncode != 0 and "needs --dataset_path" in done.stderr


@pytest.mark.slow  # 50 s (compiles the demo model's longer prefill shapes)
def test_benchmark_runs_a_shifting_workload(tmp_path, repo_root):
  out = tmp_path / "bench.json"
  done = _run(repo_root, "benchmark.py", "--progress=false", "--mode=colocated",
              "--dataset_name=shifting", "--shifting_phases=prefill_heavy:2:4,decode_heavy:2:4",
              "--config.engine.max_seq_len=512", f"--output_json={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["workload_phases"] == [["prefill_heavy", 0.0, 2.0], ["decode_heavy", 2.0, 4.0]]
  assert result["completed"] == result["num_prompts"] > 5 and result["failed"] == 0
