"""The isolation experiment disaggregation exists for, on a 2-core machine.

    python launch/bench_isolation.py --output_json=docs/results/isolation.json

Disaggregated: a prefill worker pinned to core 0 and a decode worker pinned to core 1 (separate
processes, --cluster=ray; the driver and Ray's own processes on core 0). Colocated: the in-process
engine with chunked prefill on both cores. Each serves two Poisson workloads at the same rate and
output lengths: `prefill_heavy` (long prompts) and a no-prefill-load baseline (tiny prompts). The
question is how much each mode's decode ITL p99 degrades under prefill load (decode ITL: every
gap but each request's first, which in disaggregated mode holds the KV transfer; the vLLM ITL
including it is reported beside). Every run is
`launch/benchmark.py`; this script only sequences them and computes the ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("model_path", None, "Model directory; default: the demo model.")
flags.DEFINE_integer("num_prompts", 120, "Requests per run.")
flags.DEFINE_float("request_rate", 3.0, "Poisson arrival rate (req/s) of every run.")
flags.DEFINE_integer("prompt_len", 320, "Prompt tokens of the prefill-heavy workload.")
flags.DEFINE_integer("baseline_prompt_len", 8, "Prompt tokens of the no-prefill-load baseline.")
flags.DEFINE_integer("output_len", 32, "Output tokens of every request.")
flags.DEFINE_string("goodput", "ttft:1000,tpot:100", "SLOs for goodput (ms).")
flags.DEFINE_integer("colocated_chunk_size", 128, "Prefill chunk of the colocated engine.")
flags.DEFINE_bool("only_colocated", False, "Skip the disaggregated runs (e.g. to vary the "
                  "colocated chunk size).")
flags.DEFINE_string("output_json", None, "Write the runs and ratios here.")
FLAGS = flags.FLAGS

COMMON = ["--config.engine.max_seq_len=512", "--config.engine.decode_batch=16",
          "--random_range_ratio=0.25", "--progress=false", "--seed=0"]
MODES = {
    "colocated (both cores)": ["--mode=colocated", "--devices=1"],
    "disaggregated (prefill core 0, decode core 1)": [
        "--mode=disagg", "--cluster=ray", "--prefill_devices=1", "--decode_devices=1",
        "--prefill_cpus=0", "--decode_cpus=1", "--driver_cpus=0"],
}


def run(mode_flags, prompt_len, out_dir, name):
  out = os.path.join(out_dir, f"{name}.json")
  flags_ = [sys.executable, os.path.join(os.path.dirname(__file__), "benchmark.py"),
            *mode_flags, *COMMON, f"--num_prompts={FLAGS.num_prompts}",
            f"--request_rate={FLAGS.request_rate}", f"--random_input_len={prompt_len}",
            f"--random_output_len={FLAGS.output_len}", f"--goodput={FLAGS.goodput}",
            f"--output_json={out}"]
  if FLAGS.model_path:
    flags_.append(f"--model_path={FLAGS.model_path}")
  start = time.time()
  result = subprocess.run(flags_, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"{name} failed:\n{result.stderr[-2000:]}")
  with open(out) as f:
    result = json.load(f)
  print(f"{name}: {time.time() - start:.0f} s, decode ITL p99 {result['p99_decode_itl_ms']:.1f} "
        f"ms, ITL p99 {result['p99_itl_ms']:.1f} ms, "
        f"TTFT p90 {result['p90_ttft_ms']:.1f} ms, goodput {result['request_goodput']:.2f} req/s",
        flush=True)
  return result


def main(argv):
  del argv
  out_dir = tempfile.mkdtemp(prefix="isolation_")
  report = {"date": time.strftime("%Y-%m-%d %H:%M"), "flags": {
      k: FLAGS[k].value for k in ("num_prompts", "request_rate", "prompt_len",
                                  "baseline_prompt_len", "output_len", "goodput",
                                  "colocated_chunk_size")},
            "modes": {}}
  modes = MODES if not FLAGS.only_colocated else {
      k: v for k, v in MODES.items() if k.startswith("colocated")}
  for label, mode_flags in modes.items():
    key = "disagg" if "disagg" in mode_flags[0] else "colocated"
    if key == "colocated":
      mode_flags = mode_flags + [f"--config.engine.chunk_size={FLAGS.colocated_chunk_size}"]
    baseline = run(mode_flags, FLAGS.baseline_prompt_len, out_dir, f"{key}_no_prefill_load")
    loaded = run(mode_flags, FLAGS.prompt_len, out_dir, f"{key}_prefill_heavy")
    report["modes"][label] = {
        "decode_itl_p99_ms_no_prefill_load": baseline["p99_decode_itl_ms"],
        "decode_itl_p99_ms_prefill_heavy": loaded["p99_decode_itl_ms"],
        "decode_itl_p99_degradation": loaded["p99_decode_itl_ms"] / baseline["p99_decode_itl_ms"],
        "itl_p99_ms_no_prefill_load": baseline["p99_itl_ms"],
        "itl_p99_ms_prefill_heavy": loaded["p99_itl_ms"],
        "itl_p99_degradation": loaded["p99_itl_ms"] / baseline["p99_itl_ms"],
        "transfer_mean_ms_prefill_heavy": loaded["mean_transfer_ms"],
        "ttft_p90_ms_prefill_heavy": loaded["p90_ttft_ms"],
        "goodput_prefill_heavy": loaded["request_goodput"],
        "slo_attainment_prefill_heavy": loaded["slo_attainment"],
        "runs": {"no_prefill_load": baseline, "prefill_heavy": loaded}}
  print(json.dumps({m: {k: v for k, v in r.items() if k != "runs"}
                    for m, r in report["modes"].items()}, indent=1))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
