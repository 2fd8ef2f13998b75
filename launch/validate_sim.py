r"""The simulator against the engine on this machine: profile once, then run and simulate the same
workload at several rates, and report the errors.

    python launch/validate_sim.py --mode=colocated --num_cpu_devices=8 --devices=4 \
        --rates=2,4,6 --dataset_name=random --num_prompts=160 --output_dir=docs/results/sim
    python launch/validate_sim.py --mode=disagg --num_cpu_devices=8 --prefill_devices=2 \
        --decode_devices=2 ...same flags...

Each call appends one row per rate and measured run to OUTPUT_DIR/validation.jsonl (measured JSON,
simulated JSON, errors, and the call's session id) and rewrites from all rows there:
validation.md (the tables), validation.png (the plot), and fidelity.md / fidelity.json — the
simulator's error against the mean of the real runs set against the real runs' own spread, per
metric, with a verdict (within the noise; medians and throughput also within 5%). Both
modes can write into the same OUTPUT_DIR: the reports cover every row there (launch/fidelity.py
runs the two calls).
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
cli.define_workload_flags()
flags.FLAGS.set_default("mode", "colocated")
flags.DEFINE_list("rates", ["2", "4", "6"], "Request rates to run and simulate.")
flags.DEFINE_string("output_dir", "sim_validation", "Where the rows, the table and the plot go.")
flags.DEFINE_integer("profile_iters", 5, "Timed calls per step shape when profiling.")
flags.DEFINE_integer("repeats", 1, "Measured runs per rate (the same requests and arrivals "
                     "each time): their differences are the measurement's own noise.")
flags.DEFINE_multi_string("extra_goodput", [], "More SLO sets (as --goodput) whose attainment "
                          "to compare on the same runs; repeatable.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.setup_jax()
  if FLAGS.mode == "single":
    raise app.UsageError("--mode=colocated or --mode=disagg")
  if FLAGS.repeats < 1:
    raise app.UsageError(f"--repeats={FLAGS.repeats} must be >= 1")
  from disagg_jax.bench import calibration, metrics, runner  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import simulator, validate  # pylint: disable=g-import-not-at-top
  try:
    rates = [float(r) for r in FLAGS.rates]
  except ValueError:
    raise app.UsageError(f"--rates={','.join(FLAGS.rates)} must be numbers") from None
  try:
    extra_slos = {spec: metrics.parse_goodput(spec) for spec in FLAGS.extra_goodput}
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  # Rows of this call share it: the fidelity report groups the real runs of one simulation by it.
  session = f"{FLAGS.mode}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
  # The simulator models the dense prefill step: the prefill mesh's cache stays off.
  FLAGS.config.engine.prefill_cache_tokens = 0
  engine = cli.build_engine(FLAGS.config)
  try:
    table = calibration.profile_engine(engine, iters=FLAGS.profile_iters)
    table.meta["flags"] = cli.engine_flag_values(FLAGS.config)
    table.save(os.path.join(FLAGS.output_dir, f"profile_{FLAGS.mode}.json"))
    rows, workloads = [], {}
    for rate in rates:
      FLAGS.request_rate = rate
      requests, arrivals, slos = cli.workload_from_flags(FLAGS.config)
      sim = simulator.simulate(table, [len(r.prompt_token_ids) for r in requests],
                               [r.output_len for r in requests], arrivals,
                               prompts=[r.prompt_token_ids for r in requests])
      workloads[rate] = (requests, arrivals, slos, sim,
                         metrics.compute(sim.records, sim.duration, slos))
    # The real runs go round the rates (run 1 of every rate, then run 2, ...): the runs of one
    # rate lie minutes apart, as the profile lies minutes before them, so their difference
    # includes how this machine's speed drifts over a call (run back to back, they understated
    # it: on 2026-12-02 one served workload's median TPOT was 6.1 ms in one call, 3.8 ms in
    # another).
    for repeat in range(FLAGS.repeats):
      for rate in rates:
        requests, arrivals, slos, sim, simulated = workloads[rate]
        records, duration = runner.run(engine, requests, arrivals, seed=FLAGS.seed,
                                       progress=False)
        measured = metrics.compute(records, duration, slos)
        row = {"mode": FLAGS.mode, "request_rate": rate, "repeat": repeat, "session": session,
               "dataset_name": FLAGS.dataset_name, "num_prompts": FLAGS.num_prompts,
               "goodput": FLAGS.goodput, "measured": measured, "simulated": simulated,
               "errors": validate.compare(measured, simulated),
               "attainment": {spec: [metrics.compute(records, duration,
                                                     extra)["slo_attainment"],
                                     metrics.compute(sim.records, sim.duration,
                                                     extra)["slo_attainment"]]
                              for spec, extra in extra_slos.items()}}
        rows.append(row)
        print(json.dumps({"mode": FLAGS.mode, "rate": rate, "repeat": repeat,
                          "errors": row["errors"]}), flush=True)
  finally:
    engine.shutdown()
  rows.sort(key=lambda row: (row["request_rate"], row["repeat"]))
  path = os.path.join(FLAGS.output_dir, "validation.jsonl")
  with open(path, "a") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  with open(path) as f:
    all_rows = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(FLAGS.output_dir, "validation.md"), "w") as f:
    f.write("measured / simulated (error)\n\n" + validate.markdown_table(all_rows) + "\n")
    noise = validate.repeatability_table(all_rows)
    if noise:
      f.write("\nmeasured run against measured run (the same requests and arrivals), "
              "second / first (difference)\n\n" + noise + "\n")
    if any(row.get("attainment") for row in all_rows):
      f.write("\nSLO attainment at other SLOs, measured / simulated (error)\n\n"
              + validate.attainment_table(all_rows) + "\n")
  validate.plot(all_rows, os.path.join(FLAGS.output_dir, "validation.png"))
  groups = validate.fidelity(all_rows)
  with open(os.path.join(FLAGS.output_dir, "fidelity.json"), "w") as f:
    json.dump({"groups": groups, "summary": validate.fidelity_summary(groups)}, f, indent=1)
  with open(os.path.join(FLAGS.output_dir, "fidelity.md"), "w") as f:
    f.write(validate.fidelity_markdown(all_rows))
  print(validate.markdown_table(all_rows))
  print()
  print(validate.fidelity_table(groups))
  print("\n".join(validate.fidelity_summary_lines(groups)))
  return 0


if __name__ == "__main__":
  cli.run(main)
