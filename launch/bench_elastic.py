r"""Elastic prefill:decode against every static split, simulated on a shifting workload.

    python launch/bench_elastic.py --model_config=llama3_8b --hardware=h100 --num_devices=8 \
        --dataset_name=shifting --output_json=elastic.json --plot=elastic.png

Every static disaggregated split of --num_devices chips (X prefill workers of prefill TP, Y decode
workers of decode TP, all chips used) is simulated on the workload with the analytic model of the
chips (as launch/simulate.py --hardware does), and so is the elastic engine, starting from the
best static split and reconfigured by `sched.elastic.ElasticController` as the traffic shifts
(--elastic_splits): "all" lets it choose among every static split, so a move may also change a
side's tensor parallelism (two TP2 prefill workers become one TP4 decode worker); "tp" keeps
workers of one TP on both sides (a move turns one worker's chips over; each TP is tried from its
own best split and the best reported). A leaving decode worker drains, migrates its sequences'
KV or has them recomputed (--on_move; docs/SCHEDULING.md). Goodput is the rate of requests that
meet both SLOs (--goodput), over the whole run at the workload's own rate.

The default workload and SLOs are chosen for Llama-3-8B-class models on 8 chips: phases of long
prompts with short answers, then short prompts with long answers, then long prompts again
(--shifting_phases); TTFT 2 s, TPOT 50 ms. The JSON has elastic_goodput, best_static_goodput,
best_static_split ([prefill devices, decode devices, prefill tp, decode tp]), request_rate,
goodput (the SLOs as --goodput takes them), every static split's goodput, the elastic run's
split_timeline ([time, prefill devices, decode devices]), split_changes and the controller's log,
and the launch/simulate.py command that re-simulates the best static split.
"""

from __future__ import annotations

import json
import time

from absl import app, flags

from disagg_jax import cli

cli.define_engine_flags()
cli.define_workload_flags()
flags.DEFINE_string("model_config", "llama3_8b", "A model of configs/models.")
flags.DEFINE_string("hardware", "h100", "The chips: v5e, v5p, v6e, h100, h200, a100.")
flags.DEFINE_integer("num_devices", 8, "Chips to split between prefill and decode.")
flags.DEFINE_float("switch_s", 5.0, "Seconds a worker is out of service when it changes side "
                   "(weights re-placed, steps compiled), after draining.")
flags.DEFINE_float("window_s", 5.0, "How often the controller reads its signals (seconds).")
flags.DEFINE_integer("patience", 2, "Windows in a row asking for a move before it is made.")
flags.DEFINE_enum("elastic_splits", "all", ["all", "tp"], "The splits a move may go to: every "
                  "static split (TP may change), or those with the starting workers' TP.")
flags.DEFINE_enum("on_move", "recompute", ["drain", "migrate", "recompute"], "What a decode worker "
                  "that leaves does with its sequences: finishes them (as a --cluster=ray worker "
                  "does), moves their KV to the other decode workers, or has them recomputed "
                  "(as the in-process --elastic engine does).")
flags.DEFINE_float("min_gain", 0.1, "A rate-matched move needs the busier side this much less "
                   "busy than on the current split.")
flags.DEFINE_string("output_json", None, "Results (JSON).")
flags.DEFINE_string("plot", None, "A plot of the split, the arrival rate and SLO attainment over "
                    "time (PNG).")
DEFAULT_PHASES = "4k_256:120:28,1k_1k:120:44,4k_256:120:28"
DEFAULT_GOODPUT = "ttft:2000,tpot:30"
FLAGS = flags.FLAGS
FLAGS.set_default("dataset_name", "shifting")
FLAGS.set_default("shifting_phases", DEFAULT_PHASES)
FLAGS.set_default("goodput", DEFAULT_GOODPUT)
FLAGS.set_default("mode", "disagg")


def static_splits(cfg, hw, num_devices: int, max_seq_len: int, decode_batch: int):
  """(prefill tp, decode tp, X, Y) of every split using all chips."""
  from disagg_jax.sim import analytic, planner  # pylint: disable=g-import-not-at-top
  tps = [t for t in planner.TP_CHOICES if t <= num_devices and planner.tp_ok(cfg, t)
         and analytic.fits(cfg, hw, t, decode_batch, max_seq_len)[0]]
  out = []
  for ptp in tps:
    for dtp in tps:
      for x in range(1, num_devices // ptp):
        rest = num_devices - x * ptp
        if rest >= dtp and rest % dtp == 0:
          out.append((ptp, dtp, x, rest // dtp))
  return out


def main(argv):
  del argv
  from disagg_jax.bench import metrics  # pylint: disable=g-import-not-at-top
  from disagg_jax.sched.elastic import ElasticConfig, ElasticController  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import analytic, simulator  # pylint: disable=g-import-not-at-top
  from disagg_jax.transfer.pieces import parse_transfer  # pylint: disable=g-import-not-at-top
  if FLAGS.dataset_name != "shifting":
    raise app.UsageError(f"--dataset_name={FLAGS.dataset_name}: bench_elastic runs "
                     "--dataset_name=shifting")
  cfg = analytic.model_preset(FLAGS.model_config)
  prefill_hw, hw = analytic.parse_hardware(FLAGS.hardware)
  if prefill_hw.name != hw.name:
    raise app.UsageError(f"--hardware={FLAGS.hardware}: one kind of chip (workers change sides)")
  e = FLAGS.config.engine
  max_seq_len = e.max_seq_len or cfg.max_position_embeddings
  requests, arrivals, slos = cli.workload_from_flags(FLAGS.config, model_cfg=cfg)
  if not slos or "ttft" not in slos or "tpot" not in slos:
    raise app.UsageError(f"--goodput={FLAGS.goodput} must set both ttft and tpot")
  try:  # checked before the static runs
    config = ElasticConfig(ttft_slo_s=slos["ttft"], tpot_slo_s=slos["tpot"],
                           window_s=FLAGS.window_s, patience=FLAGS.patience,
                           switch_s=FLAGS.switch_s, min_gain=FLAGS.min_gain)
  except ValueError as e:
    raise app.UsageError(f"{e} (--window_s, --patience, --switch_s, --min_gain)") from None
  prompt_lens = [len(r.prompt_token_ids) for r in requests]
  output_lens = [r.output_len for r in requests]
  rate = len(requests) / float(arrivals[-1])
  profiles = {}

  def profile(ptp, dtp):
    if (ptp, dtp) not in profiles:
      profiles[ptp, dtp] = analytic.profile_for(
          cfg, hw, mode="disagg", tp=dtp, prefill_tp=ptp, decode_batch=e.decode_batch,
          max_seq_len=max_seq_len, prefill_batch=e.prefill_batch, prefill_hw=prefill_hw,
          layers_per_group=parse_transfer(e.transfer, cfg.num_layers))
    return profiles[ptp, dtp]

  def score(result):
    return metrics.compute(result.records, result.duration, slos)

  static = []
  for ptp, dtp, x, y in static_splits(cfg, hw, FLAGS.num_devices, max_seq_len, e.decode_batch):
    out = score(simulator.simulate(profile(ptp, dtp), prompt_lens, output_lens, arrivals,
                                   num_prefill_workers=x, num_decode_workers=y))
    static.append({"split": [x * ptp, y * dtp, ptp, dtp], "num_prefill_workers": x,
                   "num_decode_workers": y, "goodput": out["request_goodput"],
                   "slo_attainment": out["slo_attainment"]})
    print(f"static {x}P(TP{ptp}) {y}D(TP{dtp}): goodput {out['request_goodput']:.3f} req/s, "
          f"attainment {out['slo_attainment']:.1%}", flush=True)
  if not static:
    raise app.UsageError(f"no split of {FLAGS.num_devices} {hw.name} chips fits "
                         f"{FLAGS.model_config}")
  best = max(static, key=lambda s: s["goodput"])

  def run_elastic(start, splits):
    controller = ElasticController(config)
    ptp, dtp = start["split"][2:]
    result = simulator.simulate_disagg(
        profile(ptp, dtp), prompt_lens, output_lens, arrivals,
        num_prefill_workers=start["num_prefill_workers"],
        num_decode_workers=start["num_decode_workers"], elastic=controller,
        splits=[simulator.Split(s["split"][2], s["split"][3], s["num_prefill_workers"],
                                s["num_decode_workers"]) for s in splits],
        profile_of=profile, on_move=FLAGS.on_move)
    return score(result), result

  runs = []
  if FLAGS.elastic_splits == "all":  # any static split, from the best one
    out, result = run_elastic(best, static)
    runs.append((out, result, best, "all"))
  else:  # workers of one TP, from that TP's best split
    for tp in sorted({s["split"][2] for s in static if s["split"][2] == s["split"][3]}):
      same = [s for s in static if s["split"][2:] == [tp, tp]]
      start = max(same, key=lambda s: s["goodput"])
      out, result = run_elastic(start, same)
      runs.append((out, result, start, tp))
  for out, result, start, tp in runs:
    print(f"elastic ({'any split' if tp == 'all' else f'TP{tp} workers'}) from "
          f"{start['split']}: goodput {out['request_goodput']:.3f} req/s, "
          f"{result.split_changes} split changes, {result.migrations} migrated, "
          f"{result.preemptions} recomputed", flush=True)
  elastic, result, start, tp = max(runs, key=lambda r: r[0]["request_goodput"])
  ptp, dtp = best["split"][2:]
  command = (f"python launch/simulate.py --hardware={FLAGS.hardware} "
             f"--model_config={FLAGS.model_config} --mode=disagg --prefill_tp={ptp} "
             f"--decode_tp={dtp} --num_prefill_workers={best['num_prefill_workers']} "
             f"--num_decode_workers={best['num_decode_workers']} --dataset_name=shifting "
             f"--shifting_phases={FLAGS.shifting_phases} --request_rate={FLAGS.request_rate} "
             f"--burstiness={FLAGS.burstiness} --seed={FLAGS.seed} --goodput={FLAGS.goodput}"
             + "".join(f" --config.engine.{k}={getattr(e, k)}" for k in
                       ("max_seq_len", "decode_batch", "prefill_batch", "transfer")))
  report = {
      "date": time.strftime("%Y-%m-%d %H:%M"), "model_config": FLAGS.model_config,
      "hardware": FLAGS.hardware, "num_devices": FLAGS.num_devices,
      "dataset_name": "shifting", "shifting_phases": FLAGS.shifting_phases,
      "num_prompts": len(requests), "request_rate": rate, "goodput": FLAGS.goodput,
      "elastic_goodput": elastic["request_goodput"],
      "elastic_slo_attainment": elastic["slo_attainment"],
      "best_static_goodput": best["goodput"], "best_static_split": best["split"],
      "elastic_vs_best_static": elastic["request_goodput"] / max(best["goodput"], 1e-12),
      "elastic_start_split": start["split"], "split_changes": result.split_changes,
      "split_timeline": result.split_timeline, "switch_s": FLAGS.switch_s,
      "window_s": FLAGS.window_s, "elastic_splits": FLAGS.elastic_splits,
      "on_move": FLAGS.on_move, "min_gain": FLAGS.min_gain, "elastic_tp": tp,
      "migrations": result.migrations, "recomputed_requests": result.preemptions,
      "static": static,
      "elastic_runs": [{"tp": r[3], "start": r[2]["split"], "goodput": r[0]["request_goodput"],
                        "split_changes": r[1].split_changes} for r in runs],
      "resimulate_best_static": command,
      "decisions": [d for d in result.decisions if d["action"]]}
  print(f"elastic (from {start['split']}): goodput {elastic['request_goodput']:.3f} req/s, "
        f"attainment {elastic['slo_attainment']:.1%}, {result.split_changes} split changes")
  print(f"best static {best['split']}: goodput {best['goodput']:.3f} req/s; elastic / best "
        f"static = {report['elastic_vs_best_static']:.2f}")
  print(f"re-simulate the best static split: {command}")
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)
  if FLAGS.plot:
    plot(FLAGS.plot, report, arrivals, result, slos)
  return 0


def plot(path: str, report: dict, arrivals, result, slos) -> None:
  """Split, arrival rate and SLO attainment over time (`bench.plots.elastic_timeline`)."""
  from disagg_jax.bench import metrics, plots  # pylint: disable=g-import-not-at-top
  met = [(a, metrics.meets_slos(r, slos)) for a, r in zip(arrivals, result.records)]
  plots.elastic_timeline(
      path, timeline=report["split_timeline"], arrivals=arrivals, runs={"elastic": met},
      best_split=report["best_static_split"][:2], phases=_phases(), unit="chips",
      title=f"{report['model_config']} on {report['num_devices']} x {report['hardware']}: "
            f"elastic {report['elastic_goodput']:.2f} vs best static "
            f"{report['best_static_goodput']:.2f} req/s goodput")


def _phases():
  from disagg_jax.bench import timed  # pylint: disable=g-import-not-at-top
  return timed.phase_bounds(timed.parse_phases(FLAGS.shifting_phases))


if __name__ == "__main__":
  cli.run(main)
