import json
import os
import subprocess
import sys


def test_bench_kernels_smoke(tmp_path, repo_root):
  out = tmp_path / "kernels.json"
  subprocess.run([sys.executable, os.path.join(repo_root, "launch", "bench_kernels.py"),
                  "--smoke", "--iters=1", "--warmup=1", f"--output_json={out}"],
                 check=True, capture_output=True, timeout=600)
  report = json.loads(out.read_text())
  kinds = {row["kernel"] for row in report["rows"]}
  assert kinds == {"prefill", "decode"}
  for row in report["rows"]:
    ours = [r for r in row["results"] if r["impl"].startswith("pallas")][0]
    assert ours["ms"] > 0
