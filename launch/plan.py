r"""Which configuration to run: the highest goodput per device under SLOs, from the performance
model and the simulator.

    python launch/plan.py --model_config=llama3_8b --hardware=h100 --num_devices=8 \
        --dataset_name=8k_128 --goodput=ttft:2000,tpot:50 --output_json=plan.json

--model_config names a module in configs/models (llama3_8b, llama3_70b, opt_13b, opt_66b) or
--model_path a Hugging Face / orbax directory (only its config.json is read). --hardware is one of
v5e, v5p, v6e, h100, h200, a100, or PREFILL+DECODE (h100+a100: prefill on H100s, decode on A100s,
disaggregated configurations only; --num_devices counts both kinds). disagg_jax/sim/analytic.py
holds the published figures and the calibration factors, printed with the plan. --dataset_name
is a length preset: the real-scale chat, 1k_1k, 4k_256, 8k_128 for real models, or random,
prefill_heavy, decode_heavy (the demo model's scale). Or plan over configurations measured here:

    python launch/plan.py --profiles=col_b16.json,dis_2p2d.json,... --dataset_name=random ...

ranks every configuration those step-time tables (launch/profile.py) cover, by simulated goodput,
and writes the engine flags that run each (launch/validate_plan.py runs the best for real).

Every configuration of the space is screened, the best of each mode simulated
(disagg_jax/sim/planner.py) at rates it must sustain: three request lifetimes of arrivals, the
first one not scored, and the number in the system no higher at the end than after the warm-up.
Every result is checked against the roofline (peak FLOP/s and HBM bandwidth, printed): a plan
with a configuration above it is written, flagged, and the script exits with status 1. Prints the
ranked list and how the prefill:decode split should move for the opposite workload mix, writes
the plan JSON (docs/FORMATS.md) and a Pareto plot (--plot).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from absl import app, flags

from disagg_jax import cli

flags.DEFINE_string("model_config", None, "A module of configs/models, e.g. llama3_8b.")
flags.DEFINE_string("model_path", None, "Or a checkpoint directory whose config.json to use.")
flags.DEFINE_string("hardware", "v5e", "v5e, v5p, v6e, h100, h200, a100, or PREFILL+DECODE "
                    "(e.g. h100+a100).")
flags.DEFINE_integer("num_devices", 8, "Chips to plan for.")
flags.DEFINE_string("transfer", "request", "How disaggregated units move KV, as the engine's "
                    "--config.engine.transfer: request or layers:N (docs/TRANSFER.md).")
flags.DEFINE_enum("decode_host", "same", ["same", "other"],
                  "Decode chips on the prefill chips' host (KV over NVLink / ICI) or on another "
                  "(over the network).")
flags.DEFINE_string("dataset_name", "random", "Workload (lengths only): chat, 1k_1k, 4k_256, "
                    "8k_128 (real scale), random, prefill_heavy, decode_heavy (demo scale).")
flags.DEFINE_integer("num_prompts", 4096, "Requests drawn from the workload; a simulated rate "
                     "takes as many as it needs (sustained), cycling through them.")
flags.DEFINE_integer("random_input_len", None, "Prompt tokens (presets have their own; chat: "
                     "the mean).")
flags.DEFINE_integer("random_output_len", None, "Output tokens (presets have their own; chat: "
                     "the mean).")
flags.DEFINE_float("random_range_ratio", None, "Lengths vary in [len*(1-r), len*(1+r)].")
flags.DEFINE_float("burstiness", 1.0, "Gamma shape of the arrival gaps (1: Poisson).")
flags.DEFINE_string("goodput", "ttft:500,tpot:50", "SLOs (milliseconds).")
flags.DEFINE_integer("seed", 0, "Workload and arrivals seed.")
flags.DEFINE_integer("simulate_top", 12, "Configurations simulated after the screen (half per "
                     "mode, one per mesh shape).")
flags.DEFINE_float("sustain_lifetimes", 3.0, "Arrival window per simulated rate, in lifetimes "
                   "of a long request (TTFT SLO + 99th-percentile output x decode step); the "
                   "first third is not scored.")
flags.DEFINE_integer("max_sim_requests", 12000, "At most this many requests per simulated rate "
                     "(a rate that needs more is marked sustained=false).")
flags.DEFINE_integer("max_sim_tokens", 1_000_000, "At most this many output tokens per simulated "
                     "rate (the simulation's cost; a rate that needs more is marked "
                     "sustained=false).")
flags.DEFINE_integer("show", 10, "Configurations printed.")
flags.DEFINE_string("output_json", None, "Ranked configurations (JSON).")
flags.DEFINE_string("plot", None, "Pareto plot (PNG): tokens/s per device vs per user.")
flags.DEFINE_bool("compare_mix", True, "Also plan the opposite workload mix's best split.")
flags.DEFINE_list("profiles", None, "Plan over these measured step-time tables (launch/"
                  "profile.py) instead of the analytic model of --hardware.")
FLAGS = flags.FLAGS

OPPOSITE = {"prefill_heavy": "decode_heavy", "decode_heavy": "prefill_heavy",
            "8k_128": "1k_1k", "4k_256": "1k_1k", "1k_1k": "8k_128"}


def _model_config():
  from disagg_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  if bool(FLAGS.model_config) == bool(FLAGS.model_path):
    raise app.UsageError("give one of --model_config (configs/models) or --model_path")
  if FLAGS.model_path:
    return ModelConfig.from_dir(FLAGS.model_path)
  from disagg_jax.sim import analytic  # pylint: disable=g-import-not-at-top
  try:
    return analytic.model_preset(FLAGS.model_config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def _workload(dataset_name: str):
  from disagg_jax.bench import metrics, workloads  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import planner  # pylint: disable=g-import-not-at-top
  prompt_lens, output_lens = workloads.preset_lengths(
      dataset_name, FLAGS.num_prompts, FLAGS.seed, FLAGS.random_input_len,
      FLAGS.random_output_len, FLAGS.random_range_ratio)
  return planner.Workload(prompt_lens, output_lens, metrics.parse_goodput(FLAGS.goodput),
                          FLAGS.burstiness, FLAGS.seed)


def _sustain():
  from disagg_jax.sim import planner  # pylint: disable=g-import-not-at-top
  if not FLAGS.sustain_lifetimes > 0:
    raise ValueError(f"--sustain_lifetimes={FLAGS.sustain_lifetimes} must be positive")
  if FLAGS.max_sim_requests < 1:
    raise ValueError(f"--max_sim_requests={FLAGS.max_sim_requests} must be at least 1")
  if FLAGS.max_sim_tokens < 1:
    raise ValueError(f"--max_sim_tokens={FLAGS.max_sim_tokens} must be at least 1")
  return dataclasses.replace(planner.SUSTAIN, lifetimes=FLAGS.sustain_lifetimes,
                             max_requests=FLAGS.max_sim_requests,
                             max_tokens=FLAGS.max_sim_tokens,
                             min_requests=min(planner.SUSTAIN.min_requests,
                                              FLAGS.max_sim_requests))


def _describe_workload(workload) -> str:
  return (f"workload: {FLAGS.dataset_name}, mean prompt {workload.prompt_lens.mean():.0f} / "
          f"output {workload.output_lens.mean():.0f} tokens; SLOs {FLAGS.goodput}; goodput = "
          f"the highest rate with >= 90% attainment, sustained (arrivals over "
          f"{FLAGS.sustain_lifetimes:g} request lifetimes, the first third not scored, the "
          f"backlog not growing)")


def _check_roofline(ranked) -> list:
  """The configurations whose goodput or throughput passes their roofline."""
  above = [p for p in ranked if p.above_roofline]
  for p in above:
    print(f"ERROR: {p.candidate.describe()}: {p.goodput:.3g} req/s simulated, above its "
          f"roofline of {p.roofline.request_rate:.3g} req/s ({p.roofline.bound}-bound): the "
          "model is wrong, this result is not physical", file=sys.stderr)
  return above


def _split(p) -> str:
  c = p.candidate
  if c.mode == "colocated":
    return f"colocated (TP{c.decode_tp})"
  return (f"{c.num_prefill_workers * c.prefill_tp}:{c.num_decode_workers * c.decode_tp} "
          f"prefill:decode chips per group")


def _workload_json(workload) -> dict:
  return {"dataset_name": FLAGS.dataset_name, "prompt_lens": workload.prompt_lens.tolist(),
          "output_lens": workload.output_lens.tolist(), "goodput": FLAGS.goodput,
          "burstiness": workload.burstiness, "seed": workload.seed,
          "mean_prompt": float(workload.prompt_lens.mean()),
          "mean_output": float(workload.output_lens.mean())}


def _print_ranked(ranked):
  print(f"{'#':>3} {'goodput/dev':>11} {'req/s':>8} {'roofline':>8} {'TTFT p90':>9} "
        f"{'TPOT p90':>9}  config")
  for i, p in enumerate(ranked[:FLAGS.show]):
    m = p.metrics or {}
    roof = f"{p.goodput / p.roofline.request_rate:>7.0%}" if p.roofline else f"{'-':>7}"
    mark = "!" if p.above_roofline else ("~" if not p.sustained else " ")
    print(f"{i + 1:>3} {p.goodput_per_device:>11.3f} {p.goodput:>8.2f} {roof}{mark} "
          f"{m.get('p90_ttft_ms', float('nan')):>7.0f}ms {m.get('p90_tpot_ms', float('nan')):>7.1f}ms"
          f"  {p.candidate.describe()}")


def _plan_measured(start):
  """--profiles: every configuration the measured tables cover, simulated."""
  from disagg_jax.sim import planner  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim.profile import StepProfile  # pylint: disable=g-import-not-at-top
  try:
    profiles = [StepProfile.load(path) for path in FLAGS.profiles]
    workload = _workload(FLAGS.dataset_name)
    sustain = _sustain()
    if not workload.slos:
      raise ValueError("--goodput needs at least one SLO, e.g. ttft:100,tpot:20")
    longest = workload.max_seq_len
    short = [path for path, p in zip(FLAGS.profiles, profiles) if p.max_seq_len < longest]
    if short:
      raise ValueError(f"the workload's longest request ({longest} tokens) exceeds the "
                       f"max_seq_len of {', '.join(short)}")
    ranked, count = planner.plan_profiles(profiles, workload, sustain=sustain)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(_describe_workload(workload))
  print(f"assumptions: step times measured here ({len(profiles)} tables: "
        f"{', '.join(FLAGS.profiles)}); smaller chunk and prefill batches reuse their buckets")
  print(f"\n{count} configurations simulated, {time.perf_counter() - start:.1f} s\n")
  _print_ranked(ranked)
  result = {"profiles": FLAGS.profiles, "dataset_name": FLAGS.dataset_name,
            "goodput": FLAGS.goodput, "workload": _workload_json(workload),
            "configs_screened": count, "configs": [p.to_json() for p in ranked]}
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(result, f, indent=1)
  if FLAGS.plot:
    _plot(ranked, FLAGS.plot, f"{len(profiles)} measured tables, {FLAGS.dataset_name}")
  return 0


def main(argv):
  del argv
  from disagg_jax.bench import workloads  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import analytic, planner  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  if FLAGS.dataset_name not in workloads.LENGTH_DATASETS:
    raise app.UsageError(f"--dataset_name={FLAGS.dataset_name!r} is not one of "
                         f"{', '.join(workloads.LENGTH_DATASETS)}")
  if FLAGS.profiles:
    return _plan_measured(start)
  try:
    cfg = _model_config()
    prefill_hw, hw = analytic.parse_hardware(FLAGS.hardware)
    if FLAGS.num_devices < 1:
      raise ValueError(f"--num_devices={FLAGS.num_devices} must be >= 1")
    workload = _workload(FLAGS.dataset_name)
    sustain = _sustain()
    if not workload.slos:
      raise ValueError("--goodput needs at least one SLO, e.g. ttft:500,tpot:50")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  hetero = prefill_hw.name != hw.name
  kinds = f"{prefill_hw.name} prefill + {hw.name} decode" if hetero else hw.name
  print(f"model: {cfg.num_params() / 1e9:.2f}B parameters, {cfg.num_layers} layers, "
        f"{cfg.num_heads}/{cfg.num_kv_heads} heads; {FLAGS.num_devices} x {kinds}")
  for chip in ((prefill_hw, hw) if hetero else (hw,)):
    print("assumptions: " + analytic.describe(chip))
  print("  bf16 weights and KV; a step costs max(FLOPs / (TP x peak x MFU), bytes / (TP x HBM x "
        "MBU)) + 2 ring all-reduces per layer + the per-step overhead; KV moves over the "
        "interconnect" + (" (between nodes: the network)" if hetero else "")
        + "; 90% of HBM for weights + KV; replicas of a unit split the load evenly")
  print(_describe_workload(workload))
  if not hetero:
    bound = analytic.roofline(cfg, workload.prompt_lens, workload.output_lens, hardware=hw,
                              devices=FLAGS.num_devices)
    print(f"roofline of {FLAGS.num_devices} x {hw.name} at peak: {bound.request_rate:.4g} req/s "
          f"({bound.request_rate / FLAGS.num_devices:.4g} per device, "
          f"{bound.output_tokens_per_s:.4g} output tokens/s), {bound.bound}-bound")
  try:
    from disagg_jax.transfer.pieces import parse_transfer  # pylint: disable=g-import-not-at-top
    ranked, screened = planner.plan(
        cfg, hw, FLAGS.num_devices, workload, simulate_top=FLAGS.simulate_top,
        prefill_hw=prefill_hw, sustain=sustain,
        layers_per_group=parse_transfer(FLAGS.transfer, cfg.num_layers),
        across_hosts=FLAGS.decode_host == "other")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  print(f"\n{screened} configurations screened, {len(ranked)} simulated, "
        f"{time.perf_counter() - start:.1f} s\n")
  _print_ranked(ranked)
  above = _check_roofline(ranked)
  result = {"model": FLAGS.model_config or FLAGS.model_path, "hardware": FLAGS.hardware,
            "prefill_hardware": prefill_hw.name, "decode_hardware": hw.name,
            "num_devices": FLAGS.num_devices, "dataset_name": FLAGS.dataset_name,
            "goodput": FLAGS.goodput,
            "assumptions": [analytic.describe(c) for c in ((prefill_hw, hw) if hetero else (hw,))],
            "sustain": dataclasses.asdict(sustain), "configs_screened": screened,
            "workload": _workload_json(workload), "above_roofline": len(above),
            "configs": [p.to_json() for p in ranked]}
  if not hetero:
    result["roofline"] = bound.to_json()
  best_disagg = next((p for p in ranked if p.candidate.mode == "disagg"), None)
  if FLAGS.compare_mix and FLAGS.dataset_name in OPPOSITE and best_disagg is not None:
    other = OPPOSITE[FLAGS.dataset_name]
    other_ranked, _ = planner.plan(cfg, hw, FLAGS.num_devices, _workload(other),
                                   simulate_top=max(FLAGS.simulate_top // 3, 1),
                                   modes=("disagg",), prefill_hw=prefill_hw, sustain=sustain)
    above += _check_roofline(other_ranked)
    if other_ranked:
      advice = (f"for {FLAGS.dataset_name}: {_split(best_disagg)} "
                f"({best_disagg.candidate.describe()}); for {other}: {_split(other_ranked[0])} "
                f"({other_ranked[0].candidate.describe()})")
      print("\nprefill:decode split as the mix shifts: " + advice)
      result["mix_shift"] = advice
  print(f"\ntotal {time.perf_counter() - start:.1f} s")
  result["plan_s"] = time.perf_counter() - start
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(result, f, indent=1)
  if FLAGS.plot:
    _plot(ranked, FLAGS.plot, f"{FLAGS.model_config or 'model'} on {FLAGS.num_devices} x "
          f"{kinds}, {FLAGS.dataset_name}")
  if above:
    print(f"ERROR: {len(above)} configuration(s) above the roofline (flagged in the JSON)",
          file=sys.stderr)
    return 1
  return 0


def _plot(ranked, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from disagg_jax.bench import plots  # pylint: disable=g-import-not-at-top
  rows = [p.to_json() for p in ranked if p.metrics]
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for mode, color in (("colocated", "tab:blue"), ("disagg", "tab:orange")):
    pts = [(r["tokens_per_s_per_user"], r["output_tokens_per_s_per_device"]) for r in rows
           if r["mode"] == mode]
    if pts:
      ax.scatter(*zip(*pts), color=color, label=mode, alpha=0.7)
  points = [(r["tokens_per_s_per_user"], r["output_tokens_per_s_per_device"]) for r in rows]
  if points:
    front = plots.pareto_frontier(points)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=1,
            label="Pareto frontier")
  ax.set_xlabel("tokens/s per user (1 / median TPOT)")
  ax.set_ylabel("output tokens/s per device (at goodput)")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  cli.run(main)
