"""launch/profile.py -> launch/simulate.py on this machine, and launch/plan.py, as users run them."""

import json
import os
import subprocess
import sys

import pytest


def _run(repo_root, script, *args, timeout=900):
  return subprocess.run([sys.executable, os.path.join(repo_root, "launch", script), *args],
                        capture_output=True, text=True, timeout=timeout)


WORKLOAD = ["--dataset_name=random", "--num_prompts=30", "--request_rate=20",
            "--random_input_len=40", "--random_output_len=6", "--goodput=ttft:2000,tpot:500"]


def test_profile_then_simulate_writes_benchmark_keys(tmp_path, repo_root):
  profile = tmp_path / "profile.json"
  done = _run(repo_root, "profile.py", "--mode=disagg", "--num_cpu_devices=2",
              "--prefill_devices=1", "--decode_devices=1", "--config.engine.max_seq_len=64",
              "--config.engine.decode_batch=4", "--iters=1", f"--output={profile}")
  assert done.returncode == 0, done.stderr[-2000:]
  table = json.loads(profile.read_text())
  assert table["mode"] == "disagg" and table["decode_s"] > 0
  assert table["prefill_s"] and table["transfer_s"] and table["insert_s"]
  assert table["contention"]["decode"] >= 1.0
  out = tmp_path / "sim.json"
  done = _run(repo_root, "simulate.py", f"--profile={profile}", *WORKLOAD,
              "--config.engine.max_seq_len=64", f"--output_json={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  for key in ("completed", "duration", "request_throughput", "output_throughput",
              "request_goodput", "median_ttft_ms", "p99_tpot_ms", "mean_transfer_ms"):
    assert key in result
  assert result["completed"] == 30 and result["mode"] == "disagg"


def test_simulate_bad_input(tmp_path, repo_root):
  (tmp_path / "bad.json").write_text("[1, 2")
  done = _run(repo_root, "simulate.py", f"--profile={tmp_path / 'bad.json'}", *WORKLOAD)
  assert done.returncode != 0 and "bad.json" in done.stderr
  done = _run(repo_root, "simulate.py", *WORKLOAD)
  assert done.returncode != 0 and "--profile" in done.stderr


def test_simulate_hardware_model(tmp_path, repo_root):
  out = tmp_path / "sim.json"
  done = _run(repo_root, "simulate.py", "--hardware=h100", "--model_config=llama3_8b",
              "--mode=disagg", "--prefill_tp=2", "--decode_tp=2", "--num_decode_workers=2",
              "--config.engine.max_seq_len=2048", *WORKLOAD, f"--output_json={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(out.read_text())["completed"] == 30


def test_plan_llama3_8b_on_v5e(tmp_path, repo_root):
  out, plot = tmp_path / "plan.json", tmp_path / "pareto.png"
  done = _run(repo_root, "plan.py", "--model_config=llama3_8b", "--hardware=v5e",
              "--num_devices=8", "--dataset_name=prefill_heavy", "--simulate_top=10",
              "--num_prompts=80", f"--output_json={out}", f"--plot={plot}", timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "assumptions:" in done.stdout and "MFU" in done.stdout
  assert "prefill:decode split as the mix shifts" in done.stdout
  result = json.loads(out.read_text())
  configs = result["configs"]
  assert configs and configs[0]["goodput_per_device"] >= configs[-1]["goodput_per_device"]
  assert all(c["devices"] <= 8 for c in configs)
  assert plot.stat().st_size > 0


@pytest.mark.parametrize("args,message", [
    (["--model_config=gpt5", "--hardware=v5e"], "llama3_8b"),
    (["--model_config=llama3_8b", "--hardware=tpu9"], "v5e"),
    (["--model_config=llama3_70b", "--hardware=v5e", "--num_devices=2"], "no room"),
])
def test_plan_bad_input(repo_root, args, message):
  done = _run(repo_root, "plan.py", *args, timeout=120)
  assert done.returncode != 0 and message in done.stderr
