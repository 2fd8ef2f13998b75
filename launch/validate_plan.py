r"""Runs the planner's best configurations for real and measures their goodput.

    python launch/plan.py --profiles=a.json,b.json,... --output_json=plan.json ...
    python launch/validate_plan.py --plan=plan.json --top=5 --num_cpu_devices=8 \
        --output_json=plan_measured.json

For each of the plan's first --top configurations (a plan over measured tables, whose entries
carry the engine flags that run them), builds that engine and finds the highest request rate at
which >= 90% of the plan's own workload (its first --num_prompts requests: the same lengths,
SLOs and arrival seed) meets the SLOs: a run at the simulated goodput, then brackets by factors of --bracket and --steps
bisections between them. Prints simulated against measured goodput and the planner's check:
the top configuration's measured goodput over the best measured among the five.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
flags.DEFINE_string("plan", None, "A plan.py --profiles JSON.", required=True)
flags.DEFINE_integer("top", 5, "How many of the plan's best configurations to run.")
flags.DEFINE_list("also", [], "Ranks (1-based) to run as well, for reference, e.g. the best of "
                  "the other mode; they do not enter the top-N check.")
flags.DEFINE_integer("steps", 4, "Bisections of the measured goodput's bracket.")
flags.DEFINE_float("bracket", 1.3, "Factor by which the first bracket grows or shrinks.")
flags.DEFINE_integer("num_prompts", 200, "Requests per measured run: the first N of the plan's "
                     "workload (0: all; plan.py draws 4096 by default, hours per run on a CPU).")
flags.DEFINE_string("output_json", None, "Simulated and measured goodput per configuration.")
FLAGS = flags.FLAGS

ATTAINMENT = 0.9


def _requests(workload: dict, vocab_size: int, limit: int = 0):
  """The plan's requests (random ids of its lengths), the first `limit` of them (0: all)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from disagg_jax.bench.workloads import BenchRequest  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(workload["seed"])
  lengths = list(zip(workload["prompt_lens"], workload["output_lens"]))
  return [BenchRequest([int(t) for t in rng.integers(3, vocab_size, int(n))], int(o))
          for n, o in lengths[:limit or len(lengths)]]


def measured_goodput(engine, requests, workload: dict, start_rate: float, *, steps: int,
                     bracket: float, log) -> tuple[float, list[dict]]:
  """The highest rate with >= 90% attainment, from real runs: returns (rate, the runs)."""
  from disagg_jax.bench import arrivals as arrivals_lib  # pylint: disable=g-import-not-at-top
  from disagg_jax.bench import metrics, runner  # pylint: disable=g-import-not-at-top
  slos = metrics.parse_goodput(workload["goodput"])
  runs = []

  def attainment(rate):
    arrivals = arrivals_lib.arrival_times(len(requests), rate, workload["burstiness"],
                                          workload["seed"])
    records, duration = runner.run(engine, requests, arrivals, seed=workload["seed"],
                                   progress=False)
    out = metrics.compute(records, duration, slos)
    runs.append({"rate": rate, "slo_attainment": out["slo_attainment"],
                 "median_ttft_ms": out["median_ttft_ms"], "p90_ttft_ms": out["p90_ttft_ms"],
                 "median_tpot_ms": out["median_tpot_ms"], "p90_tpot_ms": out["p90_tpot_ms"]})
    log(f"  {rate:7.2f} req/s: attainment {out['slo_attainment']:.1%}")
    return out["slo_attainment"] >= ATTAINMENT

  lo, hi = 0.0, None
  rate = start_rate
  for _ in range(4):
    if attainment(rate):
      lo = rate
      if hi is not None:
        break
      rate *= bracket
    else:
      hi = rate
      if lo:
        break
      rate /= bracket
  if hi is None:  # met the SLOs up to the last bracket
    return lo, runs
  for _ in range(steps):
    mid = (lo + hi) / 2 if lo else hi / bracket
    if attainment(mid):
      lo = mid
    else:
      hi = mid
  return lo, runs


def main(argv):
  del argv
  try:
    with open(FLAGS.plan) as f:
      plan = json.load(f)
    ranks = list(range(1, FLAGS.top + 1)) + [int(r) for r in FLAGS.also
                                              if int(r) > FLAGS.top]
    if max(ranks) > len(plan["configs"]):
      raise ValueError(f"rank {max(ranks)} asked for, {len(plan['configs'])} configurations")
    configs = [plan["configs"][r - 1] for r in ranks]
    workload = plan["workload"]
    if not configs or any("flags" not in c for c in configs):
      raise ValueError("its configurations carry no engine flags: make it with plan.py "
                       "--profiles")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise app.UsageError(f"--plan={FLAGS.plan}: not a plan over measured tables ({e})") from None
  if FLAGS.top < 1 or FLAGS.steps < 0 or FLAGS.bracket <= 1 or FLAGS.num_prompts < 0:
    raise app.UsageError(f"--top={FLAGS.top} must be >= 1, --steps={FLAGS.steps} >= 0, "
                         f"--bracket={FLAGS.bracket} > 1 and --num_prompts={FLAGS.num_prompts} "
                         ">= 0")
  if not FLAGS.num_cpu_devices:  # CPU: simulate as many devices as the largest configuration
    FLAGS.num_cpu_devices = max(int(c.get("devices", 1)) for c in configs)
  cli.setup_jax()
  results = []
  for rank, config in zip(ranks, configs):
    try:
      cli.set_engine_flags(FLAGS.config, config["flags"])
    except ValueError as e:
      raise app.UsageError(f"--plan={FLAGS.plan}, configuration {rank}: {e}") from None
    print(f"#{rank} {config['mode']}: simulated goodput {config['goodput']:.2f} req/s "
          f"({json.dumps(config['flags'])})", flush=True)
    start = time.perf_counter()
    engine = cli.build_engine(FLAGS.config)
    try:
      requests = _requests(workload, engine.model_cfg.vocab_size, FLAGS.num_prompts)
      rate, runs = measured_goodput(engine, requests, workload, config["goodput"],
                                    steps=FLAGS.steps, bracket=FLAGS.bracket,
                                    log=lambda line: print(line, flush=True))
    finally:
      engine.shutdown()
    results.append({"rank": rank, "mode": config["mode"], "flags": config["flags"],
                    "devices": config["devices"], "simulated_goodput": config["goodput"],
                    "measured_goodput": rate, "measured_goodput_per_device":
                    rate / config["devices"], "runs": runs,
                    "seconds": time.perf_counter() - start})
    print(f"#{rank}: measured goodput {rate:.2f} req/s (simulated {config['goodput']:.2f})",
          flush=True)
  top = [r for r in results if r["rank"] <= FLAGS.top]
  best = max(r["measured_goodput_per_device"] for r in top)
  ratio = top[0]["measured_goodput_per_device"] / best if best else float("nan")
  print(f"\n{'#':>3} {'simulated':>10} {'measured':>9}  (req/s per device)")
  for r in results:
    print(f"{r['rank']:>3} {r['simulated_goodput'] / r['devices']:>10.3f} "
          f"{r['measured_goodput_per_device']:>9.3f}  {r['mode']}")
  print(f"planner's top configuration: {ratio:.1%} of the best measured goodput of the top "
        f"{len(top)}")
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump({"plan": FLAGS.plan, "top_over_best": ratio, "configs": results}, f, indent=1)
  return 0


if __name__ == "__main__":
  cli.run(main)
