"""Simulates a benchmark run from a step-time table instead of running the engine.

    python launch/profile.py --mode=disagg ... --output=dis.json      # once per configuration
    python launch/simulate.py --profile=dis.json --dataset_name=prefill_heavy \
        --num_prompts=200 --request_rate=4 --goodput=ttft:500,tpot:60 --output_json=sim.json
    python launch/simulate.py --hardware=h100 --model_config=llama3_8b --mode=disagg \
        --prefill_tp=2 --decode_tp=2 --num_prefill_workers=2 --num_decode_workers=1 \
        --config.engine.max_seq_len=2048 --config.engine.decode_batch=64 --request_rate=20

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
flags.DEFINE_string("hardware", None, "Or the analytic model of v5e, v5p, v6e, h100, h200 "
                    "(TP from --tp / --prefill_tp / --decode_tp, default 1).")
flags.DEFINE_string("model_config", None, "--hardware: a model of configs/models instead of "
                    "--model_path, e.g. llama3_8b.")
flags.DEFINE_string("output_json", None, "The simulated run's metrics (JSON).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if bool(FLAGS.profile) == bool(FLAGS.hardware):
    raise app.UsageError("give one of --profile=FILE (from launch/profile.py) or --hardware=NAME")
  from disagg_jax.bench import metrics, report  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import profile as profile_lib  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import simulator  # pylint: disable=g-import-not-at-top
  try:
    if FLAGS.max_concurrency is not None:
      raise ValueError("--max_concurrency is not simulated; leave it unset")
    preset = None
    if FLAGS.profile:
      table = profile_lib.StepProfile.load(FLAGS.profile)
      workers = (1, 1)
    else:
      table, preset = _analytic_profile()
      workers = (FLAGS.num_prefill_workers, FLAGS.num_decode_workers)
    requests, arrivals, slos = cli.workload_from_flags(FLAGS.config, model_cfg=preset)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  start = time.perf_counter()
  result = simulator.simulate(table, [len(r.prompt_token_ids) for r in requests],
                              [r.output_len for r in requests], arrivals,
                              num_prefill_workers=workers[0], num_decode_workers=workers[1])
  out = metrics.compute(result.records, result.duration, slos)
  out.update(backend="simulated", mode=table.mode, dataset_name=FLAGS.dataset_name,
             num_prompts=FLAGS.num_prompts, request_rate=FLAGS.request_rate,
             burstiness=FLAGS.burstiness, max_concurrency=None, goodput=FLAGS.goodput,
             date=time.strftime("%Y-%m-%d %H:%M"), num_devices=table.meta.get("num_devices"),
             profile=FLAGS.profile, hardware=FLAGS.hardware, page_stalls=result.page_stalls,
             simulation_s=time.perf_counter() - start)
  print(report.format_table(out, f"simulated {table.mode} on {FLAGS.dataset_name}"))
  if FLAGS.output_json:
    report.write_json(FLAGS.output_json, out)
  return 0


def _analytic_profile():
  from disagg_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.loading import DEMO_MODEL_DIR  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import analytic  # pylint: disable=g-import-not-at-top
  if FLAGS.mode not in ("colocated", "disagg"):
    raise ValueError(f"--mode={FLAGS.mode}: simulate colocated or disagg")
  hw = analytic.get_hardware(FLAGS.hardware)
  preset = analytic.model_preset(FLAGS.model_config) if FLAGS.model_config else None
  cfg = preset or ModelConfig.from_dir(FLAGS.model_path or DEMO_MODEL_DIR)
  e = FLAGS.config.engine
  max_seq_len = e.max_seq_len or cfg.max_position_embeddings
  if FLAGS.mode == "colocated":
    return analytic.profile_for(cfg, hw, mode="colocated", tp=FLAGS.tp or 1,
                                decode_batch=e.decode_batch, max_seq_len=max_seq_len,
                                chunk_size=e.chunk_size, chunk_batch=e.chunk_batch), preset
  return analytic.profile_for(cfg, hw, mode="disagg", tp=FLAGS.decode_tp or 1,
                              prefill_tp=FLAGS.prefill_tp or 1, decode_batch=e.decode_batch,
                              max_seq_len=max_seq_len, prefill_batch=e.prefill_batch), preset


if __name__ == "__main__":
  app.run(main)
