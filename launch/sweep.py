r"""Ablation sweeps: every engine configuration of an experiment, on every workload and rate.

    python launch/sweep.py --experiment=configs/experiments/small.py --output_dir=runs/small
    python launch/sweep.py --experiment=configs/experiments/split_ablation.py \
        --experiment.rates='(1.0, 4.0)' --output_dir=runs/split

Writes results.jsonl (one row per run: the benchmark JSON plus the configuration and per-request
TTFTs and ITLs) and the plots: ttft_cdf.png, itl_cdf.png, goodput_vs_rate.png, pareto.png and
phases.png.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from disagg_jax import cli

config_flags.DEFINE_config_file("experiment", None, "Experiment config (configs/experiments/).",
                                lock_config=True)
flags.DEFINE_string("output_dir", None, "Where results and plots go.", required=True)
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flag_as_required("experiment")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  experiment = FLAGS.experiment
  try:  # ml_collections reports a config file it could not load only when it is first read
    experiment.num_cpu_devices  # pylint: disable=pointless-statement
  except OSError as e:
    path = config_flags.get_config_filename(FLAGS["experiment"])
    raise app.UsageError(f"--experiment={path}: {str(e).strip().splitlines()[-1].strip()}"
                         ) from None
  if experiment.num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", experiment.num_cpu_devices)
  from disagg_jax.bench import plots, sweep  # pylint: disable=g-import-not-at-top
  rows = sweep.run(experiment, FLAGS.output_dir, progress=FLAGS.progress)
  for path in plots.all_plots(rows, FLAGS.output_dir):
    print("wrote", path)


if __name__ == "__main__":
  cli.run(main)
