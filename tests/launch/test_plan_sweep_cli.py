"""plan.py and sweep.py fail as the other scripts do (one `error:` line, status 2), and
simulate.py --hardware runs on its default --mode, validate_plan.py serves --num_prompts requests."""

import json
import os
import subprocess
import sys

import pytest


def _run(repo_root, script, *flags, timeout=120):
  return subprocess.run([sys.executable, os.path.join(repo_root, "launch", script), *flags],
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("script, flags, message", [
    ("plan.py", ["--model_config=llama3_8b", "--hardware=foo"], "--hardware='foo'"),
    ("plan.py", ["--model_config=llama3_8b", "--num_devicez=3"], "num_devicez"),
    ("plan.py", ["--model_config=llama3_8b", "--num_devices=0"], "--num_devices=0"),
    ("sweep.py", ["--output_dir=unused"], "--experiment"),
    ("sweep.py", ["--experiment=no_such_experiment.py", "--output_dir=unused"],
     "no_such_experiment.py"),
    ("sweep.py", ["--experiment=configs/experiments/small.py", "--output_dir=unused",
                  "--experiment.ratez=1"], "did you mean rates"),
])
def test_one_error_line_and_status_2(repo_root, script, flags, message):
  done = subprocess.run([sys.executable, os.path.join("launch", script), *flags], cwd=repo_root,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and message in done.stderr, \
      done.stderr[-2000:]
  assert "Traceback" not in done.stderr and "--helpfull" not in done.stdout + done.stderr
  assert not os.path.exists(os.path.join(repo_root, "unused"))


def test_simulate_hardware_defaults_to_colocated(repo_root):
  done = _run(repo_root, "simulate.py", "--hardware=h100", "--model_config=llama3_8b",
              "--dataset_name=1k_1k", "--num_prompts=20", "--request_rate=2")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "simulated colocated on 1k_1k" in done.stdout


def test_validate_plan_serves_the_first_num_prompts_requests(repo_root, tmp_path):
  """A plan drawn at plan.py's default 4096 requests: each measured run serves only the first
  --num_prompts of them (all 4096 would take most of an hour per run on a CPU)."""
  flags = {"mode": "colocated", "devices": "1", "config.engine.max_seq_len": 64,
           "config.engine.decode_batch": 4, "config.engine.chunk_size": 32}
  plan = {"configs": [{"mode": "colocated", "flags": flags, "devices": 2, "goodput": 8.0}],
          "workload": {"prompt_lens": [16] * 4096, "output_lens": [4] * 4096,
                       "goodput": "ttft:60000,tpot:60000", "burstiness": 1.0, "seed": 0}}
  plan_path, out_path = tmp_path / "plan.json", tmp_path / "measured.json"
  plan_path.write_text(json.dumps(plan))
  done = _run(repo_root, "validate_plan.py", f"--plan={plan_path}", "--top=1", "--steps=0",
              "--num_prompts=4", f"--output_json={out_path}", timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  runs = json.loads(out_path.read_text())["configs"][0]["runs"]
  assert runs and all(run["slo_attainment"] == 1.0 for run in runs)
  bad = _run(repo_root, "validate_plan.py", f"--plan={plan_path}", "--top=1", "--num_prompts=-1")
  assert bad.returncode == 2 and "--num_prompts=-1" in bad.stderr
