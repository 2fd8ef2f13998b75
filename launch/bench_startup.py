"""A real-size checkpoint on default settings, as a new user runs it: start-up time from a cold and
a warm compilation cache, peak memory, and greedy outputs against transformers.

    python launch/bench_startup.py --output_json=startup.json

For each command below it runs the command twice in a fresh subprocess, first with an empty
compilation cache (cold), then with the cache the first run filled (warm), and records the wall
time until all output is written (generate.py: four prompts x 32 tokens) or until /health answers
ok (serve.py), and the process's peak resident memory. generate.py's greedy tokens are compared
with transformers' `generate` on the same prompts.

    generate.py --model_path=CKPT --mode=disagg --num_cpu_devices=4 --prefill_devices=1
        --decode_devices=1 --max_new_tokens=32
    generate.py --model_path=CKPT --mode=colocated --num_cpu_devices=4 --max_new_tokens=32
    serve.py --model_path=CKPT --mode=disagg|colocated --num_cpu_devices=4 (...) --port=P

CKPT is --model_path, or a random-weight checkpoint of configs/models/--model_config (built once
with transformers, cached).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # launch/profile.py

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("model_path", None, "A Hugging Face checkpoint directory.")
flags.DEFINE_string("model_config", "smollm2_135m",
                    "Without --model_path: a random-weight checkpoint of configs/models/NAME.py.")
flags.DEFINE_list("cases", ["generate_disagg", "generate_colocated", "serve_disagg",
                            "serve_colocated"], "Which commands to run.")
flags.DEFINE_integer("max_new_tokens", 32, "generate.py's tokens per prompt.")
flags.DEFINE_integer("timeout_s", 900, "Per run.")
flags.DEFINE_string("output_json", None, "Write the figures here.")
FLAGS = flags.FLAGS

MESH_FLAGS = {"disagg": ["--mode=disagg", "--num_cpu_devices=4", "--prefill_devices=1",
                         "--decode_devices=1"],
              "colocated": ["--mode=colocated", "--num_cpu_devices=4"]}


def _run_and_measure(argv, env, until=None, timeout=900):
  """Runs argv; returns (seconds until it exited or `until()` held, peak RSS bytes, stdout,
  stderr, exit status). With `until`, the process is stopped (SIGINT) once it holds."""
  start = time.perf_counter()
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
    seconds, done = None, None
    while done is None:  # wait4 (not poll) so that the child's resource usage is ours to read
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        done = status, usage
        break
      if seconds is None and until is not None and until():
        seconds = time.perf_counter() - start
        proc.send_signal(2)
      elif time.perf_counter() - start > timeout:
        proc.kill()
      time.sleep(0.05)
    status, usage = done
    proc.returncode = os.waitstatus_to_exitcode(status)
    if seconds is None:
      seconds = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    return (seconds, usage.ru_maxrss * 1024, out.read().decode(errors="replace"),
            err.read().decode(errors="replace"), os.waitstatus_to_exitcode(status))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _healthy(port):
  def check():
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
        return r.status == 200 and json.loads(r.read()).get("status") == "ok"
    except Exception:  # pylint: disable=broad-except
      return False
  return check


def transformers_greedy(model_dir, prompts, max_new_tokens, eos_ids):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from disagg_jax.testing import helpers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  return [helpers.hf_greedy(model, p, max_new_tokens, eos_ids) for p in prompts]


def main(argv):
  del argv
  from disagg_jax.testing import checkpoints  # pylint: disable=g-import-not-at-top
  model_dir = FLAGS.model_path or checkpoints.random_checkpoint(FLAGS.model_config)
  python = sys.executable
  report = {"model": FLAGS.model_path or f"{FLAGS.model_config} (random weights)",
            "date": time.strftime("%Y-%m-%d"), "runs": []}
  outputs = {}  # run index -> generate.py's output lines
  for case in FLAGS.cases:
    kind, mode = case.split("_")
    cache = tempfile.mkdtemp(prefix="disagg_jax_cache_")
    env = dict(os.environ)
    for temperature in ("cold", "warm"):
      out_file = os.path.join(cache, "out.jsonl")
      if kind == "generate":
        argv = [python, os.path.join(_HERE, "generate.py"), f"--model_path={model_dir}",
                *MESH_FLAGS[mode], f"--max_new_tokens={FLAGS.max_new_tokens}",
                f"--compilation_cache_dir={cache}", f"--output_file={out_file}"]
        seconds, rss, _, err, code = _run_and_measure(argv, env, timeout=FLAGS.timeout_s)
      else:
        port = _free_port()
        argv = [python, os.path.join(_HERE, "serve.py"), f"--model_path={model_dir}",
                *MESH_FLAGS[mode], f"--port={port}", f"--compilation_cache_dir={cache}"]
        seconds, rss, _, err, code = _run_and_measure(argv, env, until=_healthy(port),
                                                      timeout=FLAGS.timeout_s)
        code = 0 if seconds < FLAGS.timeout_s else code
      run = {"command": " ".join(["python"] + [os.path.relpath(argv[1])] + argv[2:]).replace(
                 model_dir, "CKPT").replace(cache, "CACHE"),
             "case": case, "cache": temperature, "seconds": round(seconds, 1),
             "peak_rss_gb": round(rss / 1e9, 2), "exit": code}
      compiled_lines = [l.rsplit("\r", 1)[-1] for l in err.splitlines() if "step shapes" in l]
      if compiled_lines:
        run["compile"] = compiled_lines[-1].strip()
      if code != 0:
        run["stderr_tail"] = err[-1500:]
      if kind == "generate" and code == 0:
        outputs[len(report["runs"])] = [json.loads(l) for l in open(out_file)]
      report["runs"].append(run)
      print(json.dumps(run), flush=True)
  # The reference last, so that no torch thread pool shares the cores with the timed runs.
  if outputs:
    from disagg_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
    cfg = ModelConfig.from_dir(model_dir)
    first = next(iter(outputs.values()))
    expected = transformers_greedy(model_dir, [l["prompt_token_ids"] for l in first],
                                   FLAGS.max_new_tokens, cfg.eos_token_ids)
    for i, lines in outputs.items():
      report["runs"][i]["greedy_equal_to_transformers"] = (
          [l["output_token_ids"] for l in lines] == expected)
      print(report["runs"][i]["case"], report["runs"][i]["cache"], "greedy equal to "
            f"transformers: {report['runs'][i]['greedy_equal_to_transformers']}", flush=True)
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)
  ok = all(r["exit"] == 0 and r.get("greedy_equal_to_transformers", True) for r in report["runs"])
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(app.run(main))
