r"""Elastic against every static split, for real, side by side: one workload, one machine.

    python launch/elastic_run.py --num_devices=4 --dataset_name=shifting \
        --shifting_phases=prefill_heavy:40:1.8,decode_heavy:40:2.5,prefill_heavy:40:1.8 --goodput=ttft:3000,tpot:150 \
        --output_dir=docs/results/elastic_real

Runs `launch/benchmark.py --mode=disagg` once per static split (P prefill devices, the rest
decode, P = 1 .. N-1, TP 1) and once with `--elastic` from the even split, one after the other with
the same workload flags (and `--extra_flags`, passed to every run), then writes to --output_dir
each run's JSON and per-request records, `summary.json` (`elastic_goodput`,
`best_static_goodput`, `best_static_split` as [prefill devices, decode devices, prefill tp,
decode tp], `elastic_vs_best_static`, `split_changes`, `split_timeline`, `request_rate`,
`goodput`, every run's goodput) and `elastic.png` (the split, the arrival rate and the SLO
attainment over time, elastic beside the best static split).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from absl import app, flags

from disagg_jax import cli

flags.DEFINE_integer("num_devices", 4, "Devices (simulated CPU devices here) shared by the sides.")
flags.DEFINE_string("model_path", None, "Model; default: the built-in demo model.")
flags.DEFINE_string("dataset_name", "shifting", "benchmark.py's --dataset_name.")
flags.DEFINE_string("shifting_phases", "prefill_heavy:40:1.8,decode_heavy:40:2.5,prefill_heavy:40:1.8",
                    "benchmark.py's --shifting_phases.")
flags.DEFINE_string("dataset_path", None, "benchmark.py's --dataset_path (trace replay).")
flags.DEFINE_float("request_rate", 2.0, "benchmark.py's --request_rate (phases may set theirs).")
flags.DEFINE_string("goodput", "ttft:3000,tpot:150", "The SLOs (benchmark.py's --goodput); the "
                    "elastic controller holds the sides to them.")
flags.DEFINE_integer("seed", 0, "Workload seed.")
flags.DEFINE_string("extra_flags", "--elastic_window_s=5 --elastic_switch_s=20 "
                    "--config.engine.decode_batch=24",
                    "More benchmark.py flags for every run (elastic ones only matter to it; the "
                    "decode batch must split evenly over every decode side's devices).")
flags.DEFINE_string("output_dir", "elastic_real", "Where the runs, the summary and the plot go.")
FLAGS = flags.FLAGS

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(name: str, args: list[str]) -> dict:
  out = os.path.join(FLAGS.output_dir, f"{name}.json")
  cmd = [sys.executable, os.path.join(HERE, "benchmark.py"), "--mode=disagg",
         f"--num_cpu_devices={FLAGS.num_devices}", f"--dataset_name={FLAGS.dataset_name}",
         f"--shifting_phases={FLAGS.shifting_phases}", f"--request_rate={FLAGS.request_rate}",
         f"--goodput={FLAGS.goodput}", f"--seed={FLAGS.seed}", "--progress=false",
         "--prefill_tp=1", "--decode_tp=1",
         f"--output_json={out}", *shlex.split(FLAGS.extra_flags), *args]
  if FLAGS.model_path:
    cmd.append(f"--model_path={FLAGS.model_path}")
  if FLAGS.dataset_path:
    cmd.append(f"--dataset_path={FLAGS.dataset_path}")
  print("$ " + " ".join(shlex.quote(c) for c in cmd[1:]), flush=True)
  subprocess.run(cmd, check=True)
  with open(out) as f:
    result = json.load(f)
  with open(out + ".requests.jsonl") as f:
    result["records"] = [json.loads(line) for line in f]
  print(f"{name}: goodput {result['request_goodput']:.3f} req/s, attainment "
        f"{result['slo_attainment']:.1%}, {result['completed']} of {result['num_prompts']} "
        f"completed", flush=True)
  return result


def main(argv):
  del argv
  n = FLAGS.num_devices
  if n < 2:
    raise app.UsageError(f"--num_devices={n}: a disaggregated split needs at least 2")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  static = {}
  for p in range(1, n):
    static[p] = _run(f"static_{p}p{n - p}d", [f"--prefill_devices={p}",
                                              f"--decode_devices={n - p}"])
  start = n // 2
  elastic = _run("elastic", [f"--prefill_devices={start}", f"--decode_devices={n - start}",
                             "--elastic"])
  best = max(static, key=lambda p: static[p]["request_goodput"])
  summary = {
      "elastic_goodput": elastic["request_goodput"],
      "best_static_goodput": static[best]["request_goodput"],
      "best_static_split": [best, n - best, 1, 1],
      "elastic_vs_best_static": elastic["request_goodput"] / max(
          static[best]["request_goodput"], 1e-12),
      "elastic_completed": elastic["completed"], "num_prompts": elastic["num_prompts"],
      "split_changes": elastic["split_changes"], "split_timeline": elastic["split_timeline"],
      "elastic_switches": elastic["elastic_switches"],
      "request_rate": FLAGS.request_rate, "goodput": FLAGS.goodput,
      "shifting_phases": FLAGS.shifting_phases, "num_devices": n,
      "static": {f"{p}P:{n - p}D": {"goodput": r["request_goodput"],
                                     "slo_attainment": r["slo_attainment"]}
                 for p, r in static.items()},
      "date": elastic["date"], "extra_flags": FLAGS.extra_flags}
  with open(os.path.join(FLAGS.output_dir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  plot(os.path.join(FLAGS.output_dir, "elastic.png"), elastic, static[best], best, n)
  print(f"elastic: goodput {summary['elastic_goodput']:.3f} req/s, {summary['split_changes']} "
        f"moves; best static {best}P:{n - best}D {summary['best_static_goodput']:.3f} req/s; "
        f"elastic / best static = {summary['elastic_vs_best_static']:.2f}")
  return 0


def plot(path: str, elastic: dict, best: dict, best_p: int, n: int) -> None:
  """Split, arrival rate and SLO attainment over time (`bench.plots.elastic_timeline`)."""
  from disagg_jax.bench import metrics, plots  # pylint: disable=g-import-not-at-top
  slos = metrics.parse_goodput(FLAGS.goodput)

  def met(run):
    records = [metrics.RequestRecord(**{k: v for k, v in r.items() if k != "tpot"})
               for r in run["records"]]
    return [(r.arrival, metrics.meets_slos(r, slos)) for r in records]
  plots.elastic_timeline(
      path, timeline=elastic["split_timeline"],
      arrivals=[r["arrival"] for r in elastic["records"]],
      runs={"elastic": met(elastic), f"best static ({best_p}P:{n - best_p}D)": met(best)},
      best_split=(best_p, n - best_p), phases=elastic.get("workload_phases"),
      title=f"real run, {n} CPU devices: elastic {elastic['request_goodput']:.2f} vs best "
            f"static {best['request_goodput']:.2f} req/s goodput")


if __name__ == "__main__":
  cli.run(main)
