r"""Simulates a benchmark run from a step-time table instead of running the engine.

    python launch/profile.py --mode=disagg ... --output=dis.json      # once per configuration
    python launch/simulate.py --profile=dis.json --dataset_name=prefill_heavy \
        --num_prompts=200 --request_rate=4 --goodput=ttft:500,tpot:60 --output_json=sim.json
    python launch/simulate.py --hardware=h100 --model_config=llama3_8b --mode=disagg \
        --prefill_tp=2 --decode_tp=2 --num_prefill_workers=2 --num_decode_workers=1 \
        --config.engine.decode_batch=64 --dataset_name=4k_256 --num_prompts=2000 \
        --request_rate=10 --warmup_fraction=0.5

Takes benchmark.py's workload flags (the same seed gives the same requests and arrival times) and
writes the same JSON keys, so a simulated and a measured run compare key by key. The engine's
scheduling policies are replayed step by step (disagg_jax/sim/simulator.py); the mode and the
engine knobs come from the profile. --hardware takes one chip (v5e, v5p, v6e, h100, h200, a100)
or PREFILL+DECODE (h100+a100, --mode=disagg). With --hardware the run's throughputs are checked
against the roofline of its chips (roofline_* keys): a run above it is written, flagged, and the
script exits with status 1. --warmup_fraction scores only requests arriving after that share of
the arrival window (a sustained rate, as plan.py measures it; 0: every request, as
benchmark.py).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
flags.FLAGS.set_default("mode", "colocated")  # --hardware; a --profile brings its own mode
cli.define_workload_flags()
flags.DEFINE_string("profile", None, "Step-time table written by launch/profile.py.")
flags.DEFINE_string("hardware", None, "Or the analytic model of v5e, v5p, v6e, h100, h200, a100 "
                    "or PREFILL+DECODE, e.g. h100+a100 (TP from --tp / --prefill_tp / "
                    "--decode_tp, default 1).")
flags.DEFINE_float("warmup_fraction", 0.0, "Score only requests arriving after this share of "
                   "the arrival window (0: all).")
flags.DEFINE_string("model_config", None, "--hardware: a model of configs/models instead of "
                    "--model_path, e.g. llama3_8b.")
flags.DEFINE_string("output_json", None, "The simulated run's metrics (JSON).")
flags.DEFINE_enum("decode_host", "same", ["same", "other"],
                  "--hardware, disagg: decode chips on the prefill chips' host (KV over NVLink / "
                  "ICI) or on another host (over the network).")
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
    if not 0 <= FLAGS.warmup_fraction < 1:
      raise ValueError(f"--warmup_fraction={FLAGS.warmup_fraction} must be in [0, 1)")
    preset, analytic_model = None, None
    if FLAGS.profile:
      table = profile_lib.StepProfile.load(FLAGS.profile)
      workers = (1, 1)
    else:
      analytic_model = _analytic_model()
      preset = analytic_model[0] if FLAGS.model_config else None
      workers = (FLAGS.num_prefill_workers, FLAGS.num_decode_workers)
    requests, arrivals, slos = cli.workload_from_flags(FLAGS.config, model_cfg=preset)
    prompt_lens = [len(r.prompt_token_ids) for r in requests]
    output_lens = [r.output_len for r in requests]
    if analytic_model:
      table = _analytic_profile(*analytic_model, int(sum(prompt_lens) / len(prompt_lens)))
    # Prefix caching as the engine does it (colocated), unless switched off: a policy setting,
    # not a measured one, so tables profiled before it existed cache too.
    table.prefix_caching = table.mode == "colocated" and FLAGS.config.engine.prefix_caching
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  start = time.perf_counter()
  result = simulator.simulate(table, prompt_lens, output_lens, arrivals,
                              num_prefill_workers=workers[0], num_decode_workers=workers[1],
                              prompts=[r.prompt_token_ids for r in requests])
  records, duration = result.records, result.duration
  if FLAGS.warmup_fraction:
    records, duration = metrics.steady_state(records, arrivals, FLAGS.warmup_fraction)
  out = metrics.compute(records, duration, slos)
  out.update(backend="simulated", mode=table.mode, dataset_name=FLAGS.dataset_name,
             num_prompts=FLAGS.num_prompts, request_rate=FLAGS.request_rate,
             burstiness=FLAGS.burstiness, max_concurrency=None, goodput=FLAGS.goodput,
             date=time.strftime("%Y-%m-%d %H:%M"), num_devices=table.meta.get("num_devices"),
             profile=FLAGS.profile, hardware=FLAGS.hardware, page_stalls=result.page_stalls,
             warmup_fraction=FLAGS.warmup_fraction, scored_requests=len(records),
             simulation_s=time.perf_counter() - start)
  out.update(cli.workload_fields(requests))
  above = False
  if analytic_model:
    bound = _roofline(analytic_model, prompt_lens, output_lens)
    above = bool(out["request_throughput"] > bound.request_rate * (1 + 1e-9)
                 or out["output_throughput"] > bound.output_tokens_per_s * (1 + 1e-9))
    out.update(roofline_request_rate=bound.request_rate,
               roofline_output_tokens_per_s=bound.output_tokens_per_s,
               roofline_bound=bound.bound, above_roofline=above)
  print(report.format_table(out, f"simulated {table.mode} on {FLAGS.dataset_name}"))
  if analytic_model:
    print(f"roofline of these chips: {bound.request_rate:.4g} req/s, "
          f"{bound.output_tokens_per_s:.4g} output tokens/s ({bound.bound}-bound)")
  if FLAGS.output_json:
    report.write_json(FLAGS.output_json, out)
  if above:
    print(f"ERROR: simulated throughput ({out['request_throughput']:.4g} req/s, "
          f"{out['output_throughput']:.4g} output tokens/s) above the roofline: the model is "
          "wrong, this result is not physical", file=sys.stderr)
    return 1
  return 0


def _analytic_model():
  """(model config, prefill chip, decode chip) of --model_config / --model_path and --hardware."""
  from disagg_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.loading import DEMO_MODEL_DIR  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import analytic  # pylint: disable=g-import-not-at-top
  if FLAGS.mode not in ("colocated", "disagg"):
    raise ValueError(f"--mode={FLAGS.mode}: simulate colocated or disagg")
  prefill_hw, hw = analytic.parse_hardware(FLAGS.hardware)
  if prefill_hw.name != hw.name and FLAGS.mode != "disagg":
    raise ValueError(f"--hardware={FLAGS.hardware} (two kinds of chip) needs --mode=disagg")
  preset = analytic.model_preset(FLAGS.model_config) if FLAGS.model_config else None
  cfg = preset or ModelConfig.from_dir(FLAGS.model_path or DEMO_MODEL_DIR)
  return cfg, prefill_hw, hw


def _analytic_profile(cfg, prefill_hw, hw, mean_prompt: int):
  from disagg_jax.sim import analytic  # pylint: disable=g-import-not-at-top
  e = FLAGS.config.engine
  max_seq_len = e.max_seq_len or cfg.max_position_embeddings
  if FLAGS.mode == "colocated":
    return analytic.profile_for(cfg, hw, mode="colocated", tp=FLAGS.tp or 1,
                                decode_batch=e.decode_batch, max_seq_len=max_seq_len,
                                chunk_size=e.chunk_size, chunk_batch=e.chunk_batch,
                                prompt_len=mean_prompt)
  from disagg_jax.transfer.pieces import parse_transfer  # pylint: disable=g-import-not-at-top
  return analytic.profile_for(cfg, hw, mode="disagg", tp=FLAGS.decode_tp or 1,
                              prefill_tp=FLAGS.prefill_tp or 1, decode_batch=e.decode_batch,
                              max_seq_len=max_seq_len, prefill_batch=e.prefill_batch,
                              prefill_hw=prefill_hw,
                              layers_per_group=parse_transfer(e.transfer, cfg.num_layers),
                              across_hosts=FLAGS.decode_host == "other")


def _roofline(analytic_model, prompt_lens, output_lens):
  from disagg_jax.sim import analytic  # pylint: disable=g-import-not-at-top
  cfg, prefill_hw, hw = analytic_model
  if FLAGS.mode == "colocated":
    return analytic.roofline(cfg, prompt_lens, output_lens, hardware=hw, devices=FLAGS.tp or 1)
  return analytic.roofline(cfg, prompt_lens, output_lens, prefill_hw=prefill_hw,
                           prefill_devices=(FLAGS.prefill_tp or 1) * FLAGS.num_prefill_workers,
                           decode_hw=hw,
                           decode_devices=(FLAGS.decode_tp or 1) * FLAGS.num_decode_workers)


if __name__ == "__main__":
  cli.run(main)
