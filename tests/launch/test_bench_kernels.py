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


def test_bench_kernels_tpu_plan(repo_root):
  """--tpu_plan runs nothing on a device: it prints both TPU decode kernels' plan."""
  out = subprocess.run([sys.executable, os.path.join(repo_root, "launch", "bench_kernels.py"),
                        "--tpu_plan", "--plan_batch=256", "--plan_context=32768"],
                       check=True, capture_output=True, text=True, timeout=300).stdout
  assert "B=256 context=32768 Hq=32 Hkv=8 D=128 page=16 bfloat16" in out
  assert "| grid (tpu_paged) | 8 pages x 1 KV head, 1 split | 524,288 | 64.0 |" in out
  assert "| ragged (tpu_ragged) | 16 pages x 8 KV heads | 32,768 | 1,024.0 |" in out
