r"""Measures the step-time table of an engine configuration, for launch/simulate.py.

    python launch/profile.py --mode=colocated --num_cpu_devices=8 --devices=4 --output=col.json
    python launch/profile.py --mode=disagg --num_cpu_devices=8 --prefill_devices=2 \
        --decode_devices=2 --output=dis.json

Takes the engine flags of generate.py / benchmark.py. Times every compiled step shape of the
engine (the decode step, the colocated mixed steps per chunk bucket, the disaggregated prefill
steps per batch x length bucket, KV transfers and inserts per length bucket) and, for the
disaggregated engine, how much prefill and decode slow each other when they run at once
(disagg_jax/sim/timing.py, calibrated on served runs by disagg_jax/bench/calibration.py). Prints
the table and writes it as JSON to --output.
"""

from __future__ import annotations

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
flags.FLAGS.set_default("mode", "colocated")
flags.DEFINE_string("output", None, "Write the table here (JSON).")
flags.DEFINE_integer("iters", 5, "Timed calls per step shape (the median is kept).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cli.setup_jax()
  if FLAGS.mode == "single":
    raise app.UsageError("--mode=single is the offline reference path; profile --mode=colocated "
                         "or --mode=disagg")
  if FLAGS.iters < 1:
    raise app.UsageError(f"--iters={FLAGS.iters} must be >= 1")
  if FLAGS.cluster != "local":
    raise app.UsageError("--cluster=ray: profile the in-process engine of the same meshes")
  from disagg_jax.bench import calibration  # pylint: disable=g-import-not-at-top
  # The simulator models the dense prefill step: the prefill mesh's cache stays off.
  FLAGS.config.engine.prefill_cache_tokens = 0
  engine = cli.build_engine(FLAGS.config)
  try:
    table = calibration.profile_engine(engine, iters=FLAGS.iters)
    table.meta["flags"] = cli.engine_flag_values(FLAGS.config)
  finally:
    engine.shutdown()
  print("\n".join(table.describe()))
  if FLAGS.output:
    table.save(FLAGS.output)
    print(f"wrote {FLAGS.output} (the table as JSON, for simulate.py and plan.py)")
  return 0


if __name__ == "__main__":
  cli.run(main)
