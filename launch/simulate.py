"""Simulates a benchmark run from a step-time table instead of running the engine.

    python launch/profile.py --mode=disagg ... --output=dis.json      # once per configuration
    python launch/simulate.py --profile=dis.json --dataset_name=prefill_heavy \
        --num_prompts=200 --request_rate=4 --goodput=ttft:500,tpot:60 --output_json=sim.json

Takes benchmark.py's workload flags (the same seed gives the same requests and arrival times) and
writes the same JSON keys, so a simulated and a measured run compare key by key. The engine's
scheduling policies are replayed step by step (disagg_jax/sim/simulator.py); the mode and the
engine knobs come from the profile.
"""

from __future__ import annotations

import time

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
cli.define_workload_flags()
flags.DEFINE_string("profile", None, "Step-time table written by launch/profile.py.")
flags.DEFINE_string("output_json", None, "The simulated run's metrics (JSON).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.profile:
    raise app.UsageError("--profile=FILE (from launch/profile.py) is required")
  from disagg_jax.bench import metrics, report  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import profile as profile_lib  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import simulator  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.max_concurrency is not None:
      raise ValueError("--max_concurrency is not simulated; leave it unset")
    table = profile_lib.StepProfile.load(FLAGS.profile)
    requests, arrivals, slos = cli.workload_from_flags(FLAGS.config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  start = time.perf_counter()
  result = simulator.simulate(table, [len(r.prompt_token_ids) for r in requests],
                              [r.output_len for r in requests], arrivals)
  out = metrics.compute(result.records, result.duration, slos)
  out.update(backend="simulated", mode=table.mode, dataset_name=FLAGS.dataset_name,
             num_prompts=FLAGS.num_prompts, request_rate=FLAGS.request_rate,
             burstiness=FLAGS.burstiness, max_concurrency=None, goodput=FLAGS.goodput,
             date=time.strftime("%Y-%m-%d %H:%M"), num_devices=table.meta.get("num_devices"),
             profile=FLAGS.profile, page_stalls=result.page_stalls,
             simulation_s=time.perf_counter() - start)
  print(report.format_table(out, f"simulated {table.mode} on {FLAGS.dataset_name}"))
  if FLAGS.output_json:
    report.write_json(FLAGS.output_json, out)
  return 0


if __name__ == "__main__":
  app.run(main)
