"""The acceptance runs of the real-size issue, for real (slow: several minutes): generate.py on a
random-weight 135M checkpoint, defaults only, disaggregated and colocated, from a cold and a warm
compilation cache: exit status, peak memory within 4 GB, greedy tokens equal to transformers'.
Timings are recorded by the same script (launch/bench_startup.py) in docs/BENCHMARKS.md, not
asserted here."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_real_size_checkpoint_on_defaults(tmp_path, repo_root):
  out = tmp_path / "startup.json"
  done = subprocess.run([sys.executable, os.path.join(repo_root, "launch", "bench_startup.py"),
                         "--cases=generate_disagg,generate_colocated", f"--output_json={out}"],
                        capture_output=True, text=True, timeout=3000)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  runs = json.loads(out.read_text())["runs"]
  assert len(runs) == 4
  for run in runs:
    assert run["exit"] == 0, run
    assert run["peak_rss_gb"] <= 4.0, run
    assert run["greedy_equal_to_transformers"], run
