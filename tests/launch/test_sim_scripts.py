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


@pytest.mark.slow  # 45 s colocated, 90 s disagg; sim.timing.measure and simulate.py have faster tests of their own
@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_profile_then_simulate_writes_benchmark_keys(tmp_path, repo_root, mode):
  profile = tmp_path / "profile.json"
  meshes = (["--devices=2"] if mode == "colocated"
            else ["--prefill_devices=1", "--decode_devices=1"])
  done = _run(repo_root, "profile.py", f"--mode={mode}", "--num_cpu_devices=2", *meshes,
              "--config.engine.max_seq_len=64", "--config.engine.decode_batch=4", "--iters=1",
              f"--output={profile}")
  assert done.returncode == 0, done.stderr[-2000:]
  table = json.loads(profile.read_text())
  assert table["mode"] == mode and table["decode_s"] > 0
  # Fitted to two served runs (bench.calibration).
  assert table["meta"]["served_decode_factor"] > 0 and len(table["meta"]["served_fit"]) == 2
  if mode == "colocated":
    assert table["mixed_s"]
  else:
    assert table["prefill_s"] and table["transfer_s"] and table["insert_s"]
    assert table["contention"]["decode"] >= 1.0
  out = tmp_path / "sim.json"
  done = _run(repo_root, "simulate.py", f"--profile={profile}", *WORKLOAD,
              "--config.engine.max_seq_len=64", f"--output_json={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  for key in ("completed", "duration", "request_throughput", "output_throughput",
              "request_goodput", "median_ttft_ms", "p99_tpot_ms"):
    assert key in result
  assert result["completed"] == 30 and result["mode"] == mode


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
  result = json.loads(out.read_text())
  assert result["completed"] == 30
  assert result["above_roofline"] is False
  assert result["request_throughput"] <= result["roofline_request_rate"]
  assert result["output_throughput"] <= result["roofline_output_tokens_per_s"]


def test_simulate_real_scale_preset_on_two_kinds_of_chip(tmp_path, repo_root):
  out = tmp_path / "sim.json"
  done = _run(repo_root, "simulate.py", "--hardware=h100+a100", "--model_config=llama3_8b",
              "--mode=disagg", "--dataset_name=chat", "--num_prompts=120", "--request_rate=4",
              "--warmup_fraction=0.5", "--goodput=ttft:1000,tpot:100",
              "--config.engine.max_seq_len=2048", f"--output_json={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["scored_requests"] < 120 and result["above_roofline"] is False
  assert result["mean_transfer_ms"] > 0  # between nodes, over the network
  done = _run(repo_root, "simulate.py", "--hardware=h100+a100", "--model_config=llama3_8b",
              "--mode=colocated", *WORKLOAD)
  assert done.returncode != 0 and "needs --mode=disagg" in done.stderr


def test_plan_llama3_8b_on_v5e(tmp_path, repo_root):
  out, plot = tmp_path / "plan.json", tmp_path / "pareto.png"
  done = _run(repo_root, "plan.py", "--model_config=llama3_8b", "--hardware=v5e",
              "--num_devices=8", "--dataset_name=prefill_heavy", "--simulate_top=2",
              f"--output_json={out}", f"--plot={plot}", timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "assumptions:" in done.stdout and "MFU" in done.stdout
  assert "roofline of 8 x v5e" in done.stdout
  assert "prefill:decode split as the mix shifts" in done.stdout
  result = json.loads(out.read_text())
  configs = result["configs"]
  assert configs and configs[0]["goodput_per_device"] >= configs[-1]["goodput_per_device"]
  assert all(c["devices"] <= 8 for c in configs)
  assert result["above_roofline"] == 0 and not any(c["above_roofline"] for c in configs)
  assert all(c["goodput"] <= result["roofline"]["request_rate"] for c in configs)
  assert plot.stat().st_size > 0


@pytest.mark.slow
def test_plan_real_scale_on_h100_stays_under_the_roofline(tmp_path, repo_root):
  out = tmp_path / "plan.json"
  done = _run(repo_root, "plan.py", "--model_config=llama3_8b", "--hardware=h100",
              "--num_devices=2", "--dataset_name=4k_256", "--goodput=ttft:2000,tpot:50",
              "--simulate_top=2", "--compare_mix=false", f"--output_json={out}", timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["workload"]["mean_prompt"] == pytest.approx(4096, rel=0.02)
  bound = result["roofline"]["request_rate"]
  for c in result["configs"]:
    assert c["sustained"] and not c["above_roofline"]
    assert c["goodput"] <= c["roofline_request_rate"] <= bound * (1 + 1e-9)


@pytest.mark.parametrize("args,message", [
    (["--model_config=gpt5", "--hardware=v5e"], "llama3_8b"),
    (["--model_config=llama3_8b", "--hardware=tpu9"], "v5e"),
    (["--model_config=llama3_8b", "--hardware=h100+tpu9"], "--hardware='tpu9' is not one of"),
    (["--model_config=llama3_70b", "--hardware=v5e", "--num_devices=2"], "no room"),
    (["--model_config=llama3_8b", "--hardware=h100", "--dataset_name=16k_1"],
     "--dataset_name='16k_1' is not one of random, prefill_heavy, decode_heavy, chat, 1k_1k"),
])
def test_plan_bad_input(repo_root, args, message):
  done = _run(repo_root, "plan.py", *args, timeout=120)
  assert done.returncode != 0 and message in done.stderr


def _profile_with_flags(path, mode):
  from disagg_jax.testing.profiles import colocated_profile, disagg_profile
  if mode == "colocated":
    table = colocated_profile(meta={"flags": {"mode": "colocated", "devices": "2", "tp": 0}})
  else:
    table = disagg_profile(meta={"flags": {"mode": "disagg", "prefill_devices": "1",
                                           "decode_devices": "1", "prefill_tp": 0,
                                           "decode_tp": 0}})
  table.save(str(path))
  return str(path)


def test_plan_over_measured_profiles(tmp_path, repo_root):
  profiles = [_profile_with_flags(tmp_path / f"{m}.json", m) for m in ("colocated", "disagg")]
  out = tmp_path / "plan.json"
  done = _run(repo_root, "plan.py", f"--profiles={','.join(profiles)}", "--num_prompts=40",
              "--random_input_len=100", "--random_output_len=8", "--goodput=ttft:500,tpot:50",
              f"--output_json={out}", timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "step times measured here" in done.stdout
  plan = json.loads(out.read_text())
  assert plan["configs_screened"] == len(plan["configs"]) == 2 * 3 + 2
  assert all("flags" in c for c in plan["configs"])
  assert len(plan["workload"]["prompt_lens"]) == 40
  # A workload longer than the tables' max_seq_len is refused, naming the file.
  done = _run(repo_root, "plan.py", f"--profiles={profiles[0]}", "--random_input_len=600",
              "--random_range_ratio=0", timeout=300)
  assert done.returncode != 0 and "colocated.json" in done.stderr


def test_validate_plan_runs_a_configuration_for_real(tmp_path, repo_root):
  plan = {"configs": [{"mode": "colocated", "devices": 1, "goodput": 10.0,
                       "flags": {"mode": "colocated", "devices": "1", "tp": 0,
                                 "config.engine.max_seq_len": 64,
                                 "config.engine.decode_batch": 4,
                                 "config.engine.chunk_size": 32}}],
          "workload": {"prompt_lens": [20, 30, 12, 40] * 5, "output_lens": [4, 6, 3, 5] * 5,
                       "goodput": "ttft:5000,tpot:2000", "burstiness": 1.0, "seed": 0}}
  path, out = tmp_path / "plan.json", tmp_path / "measured.json"
  path.write_text(json.dumps(plan))
  done = _run(repo_root, "validate_plan.py", f"--plan={path}", "--top=1", "--steps=0",
              "--bracket=2", f"--output_json={out}", timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  (config,) = result["configs"]
  # Loose SLOs: every bracket meets them, up to 2**3 x the simulated goodput.
  assert config["measured_goodput"] == pytest.approx(80.0)
  assert [run["rate"] for run in config["runs"]] == pytest.approx([10, 20, 40, 80])
  assert result["top_over_best"] == pytest.approx(1.0)
  del plan["configs"][0]["flags"]
  path.write_text(json.dumps(plan))
  done = _run(repo_root, "validate_plan.py", f"--plan={path}", "--top=1", timeout=120)
  assert done.returncode == 2 and "engine flags" in done.stderr.strip().splitlines()[-1]
