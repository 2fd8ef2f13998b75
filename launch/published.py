"""Published disaggregation results beside the analytic model's: DistServe's OPT-13B chatbot
experiment, and the trends of NVIDIA's "Beyond the Buzz".

    python launch/published.py --output_dir=docs/results/published          # both, ~15 min
    python launch/published.py --experiments=distserve --output_dir=/tmp/ds  # ~1 min

distserve — DistServe (Zhong et al., OSDI'24), Figure 8, chatbot, OPT-13B on A100-80GB:
ShareGPT requests (here the `chat` preset: lognormal lengths with DistServe's ShareGPT means,
755 prompt / 200 output tokens, pairs under 2,048), Poisson arrivals, SLOs TTFT 0.25 s and TPOT
0.1 s (the artifact's plotting script for this panel; the simulator README's example uses 0.2 s),
goodput = the per-GPU rate at 90% attainment. DistServe runs prefill on 2 GPUs (TP2) and decode
on 1 (TP1), 3 GPUs; vLLM runs the model on 1 GPU without chunked prefill. The authors' plotting
notebook reports DistServe at 4.6x vLLM's per-GPU rate for this panel (7.4x DeepSpeed-MII's;
2.75x and 2.0x vLLM's for OPT-66B / 175B). Here: the same placement (1 prefill TP2 + 1 decode
TP1) against colocated TP1 whose chunk (2,048 tokens) holds any whole prompt, one prompt per
step, scheduled synchronously as vLLM then was (`--config.engine.run_ahead=false`: each step's
tokens are read before the next step is decided); attainment at DistServe's rate grid, and each
mode's goodput by the planner's sustained search; then the planner's own best per-phase
parallelism on 4 A100s.

trends — "Beyond the Buzz: A Pragmatic Take on Inference Disaggregation" (Mitra et al., NVIDIA,
arXiv 2506.05508, 2025): "disaggregation is most effective for prefill-heavy traffic patterns and
larger models". Here: the best disaggregated against the best colocated goodput per device, for
Llama-3-8B on 8 H100 and Llama-3-70B on 32 H100 (8 TP4 groups: as many model instances of the
size the 70B needs as the 8B has GPUs), and the 70B on 8 H100, over the real-scale presets
8k_128, 4k_256, chat and 1k_1k, under one SLO set (TTFT 2 s, TPOT 50 ms).

Writes OUTPUT_DIR/published.json and OUTPUT_DIR/published.md (the tables of
docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

flags.DEFINE_list("experiments", ["distserve", "trends"], "distserve, trends.")
flags.DEFINE_string("output_dir", None, "Where published.json and published.md go.")
flags.DEFINE_integer("num_prompts", 4096, "Requests drawn from each workload (cycled).")
flags.DEFINE_integer("seed", 0, "Workload and arrival seed.")
FLAGS = flags.FLAGS

DISTSERVE_SLOS = {"ttft": 0.25, "tpot": 0.1}
DISTSERVE_RATES = (0.25, 0.5, 1.0, 1.5, 2.0, 2.25, 2.5, 3.0)  # per GPU, the artifact's grid
DISTSERVE_PUBLISHED = 4.6  # DistServe / vLLM per-GPU rate at 90% attainment, OPT-13B chatbot
# vLLM's attainment (%) at DISTSERVE_RATES in that panel, as the authors' plotting notebook
# (evaluation/2-benchmark-serving/plot.ipynb in LLMServe/DistServe) prints it; its 90% crossing
# is 0.5 req/s per GPU, so DistServe's is 4.6 x 0.5 = 2.3.
DISTSERVE_VLLM_CURVE = (90, 90, 85, 81, 71, 70, 68, 55)
DISTSERVE_VLLM_RATE = 0.5
TREND_SLOS = {"ttft": 2.0, "tpot": 0.05}
TREND_WORKLOADS = ("8k_128", "4k_256", "chat", "1k_1k")
TREND_SETUPS = (("llama3_8b", 8), ("llama3_70b", 32), ("llama3_70b", 8))
TREND_TOP = 6  # configurations simulated per plan (3 per mode), to keep the grid to minutes


def _workload(name, slos):
  from disagg_jax.bench import workloads  # pylint: disable=g-import-not-at-top
  from disagg_jax.sim import planner  # pylint: disable=g-import-not-at-top
  prompt_lens, output_lens = workloads.preset_lengths(name, FLAGS.num_prompts, FLAGS.seed)
  return planner.Workload(prompt_lens, output_lens, dict(slos), 1.0, FLAGS.seed)


def _crossing(rates, attainments, target=0.9):
  """The rate where attainment falls through `target`, linearly between grid points (as the
  DistServe artifact reads its figures); None when it never does."""
  for (r0, a0), (r1, a1) in zip(zip(rates, attainments), zip(rates[1:], attainments[1:])):
    if (a0 >= target) != (a1 >= target):
      return r0 + (target - a0) * (r1 - r0) / (a1 - a0)
  return None


def distserve() -> dict:
  from disagg_jax.sim import analytic, planner  # pylint: disable=g-import-not-at-top
  cfg = analytic.model_preset("opt_13b")
  a100 = analytic.get_hardware("a100")
  workload = _workload("chat", DISTSERVE_SLOS)
  max_seq_len = cfg.max_position_embeddings
  mean_prompt = int(workload.prompt_lens.mean())
  setups = {
      "disagg (DistServe placement: prefill TP2 + decode TP1, 3 GPUs)":
          planner.Candidate("disagg", 2, 1, 1, 1, 1, 256, prefill_batch=8),
      "colocated (vLLM: TP1, 1 GPU, whole prompts, no chunked prefill, synchronous)":
          planner.Candidate("colocated", 1, 1, 0, 0, 1, 256, chunk_size=2048, chunk_batch=1),
  }
  # vLLM as DistServe ran it schedules synchronously: the engine's
  # --config.engine.run_ahead=false. The disaggregated engine keeps its defaults.
  run_ahead = {label: c.mode != "colocated" for label, c in setups.items()}
  out = {"model": "opt_13b", "hardware": "a100", "slos": DISTSERVE_SLOS,
         "workload": {"dataset_name": "chat", "mean_prompt": float(workload.prompt_lens.mean()),
                      "mean_output": float(workload.output_lens.mean())},
         "published_ratio": DISTSERVE_PUBLISHED, "rates_per_gpu": list(DISTSERVE_RATES),
         "published_vllm_curve": list(DISTSERVE_VLLM_CURVE),
         "published_vllm_rate": DISTSERVE_VLLM_RATE,
         "published_distserve_rate": DISTSERVE_PUBLISHED * DISTSERVE_VLLM_RATE,
         "setups": {}}
  for label, c in setups.items():
    profile = dataclasses.replace(
        planner.unit_profile(c, cfg, a100, max_seq_len, prompt_len=mean_prompt),
        run_ahead=run_ahead[label])
    roof = planner.unit_roofline(c, cfg, a100, workload)
    curve = []
    for rate in DISTSERVE_RATES:
      _, m = planner.sustained_attainment(c, profile, workload, rate * c.unit_devices)
      curve.append({"rate_per_gpu": rate, "slo_attainment": m["slo_attainment"],
                    "steady": m["steady"], "rechecked": m.get("rechecked", False),
                    "p90_ttft_ms": m["p90_ttft_ms"], "p90_tpot_ms": m["p90_tpot_ms"],
                    "simulated_requests": m["simulated_requests"]})
    attain = [p["slo_attainment"] if p["steady"] else 0.0 for p in curve]
    estimate = planner.screen(c, profile, workload)
    rate, m = planner.goodput(c, profile, workload, estimate, ceiling=roof.request_rate)
    out["setups"][label] = {
        "candidate": c.to_json(), "run_ahead": run_ahead[label],
        "staging_tokens": profile.staging_tokens, "curve": curve,
        "crossing_per_gpu": _crossing(DISTSERVE_RATES, attain),
        "goodput_per_gpu": rate / c.unit_devices,
        "roofline_per_gpu": roof.request_rate / c.unit_devices,
        "at_goodput": {k: m[k] for k in ("p90_ttft_ms", "p90_tpot_ms", "median_ttft_ms",
                                         "median_tpot_ms", "simulated_requests")} if m else None}
  dis, col = (out["setups"][k] for k in setups)
  out["ratio_goodput"] = dis["goodput_per_gpu"] / max(col["goodput_per_gpu"], 1e-12)
  if dis["crossing_per_gpu"] and col["crossing_per_gpu"]:
    out["ratio_crossing"] = dis["crossing_per_gpu"] / col["crossing_per_gpu"]
  # The planner's own choice of per-phase parallelism for the same workload on 4 A100s.
  ranked, screened = planner.plan(cfg, a100, 4, workload, max_seq_len=max_seq_len)
  out["planner_4xa100"] = {"configs_screened": screened,
                           "best": {m: next((p.to_json() for p in ranked
                                             if p.candidate.mode == m), None)
                                    for m in ("colocated", "disagg")}}
  return out


def trends() -> dict:
  from disagg_jax.sim import analytic, planner  # pylint: disable=g-import-not-at-top
  h100 = analytic.get_hardware("h100")
  rows = []
  for model, devices in TREND_SETUPS:
    cfg = analytic.model_preset(model)
    for name in TREND_WORKLOADS:
      workload = _workload(name, TREND_SLOS)
      start = time.perf_counter()
      ranked, screened = planner.plan(cfg, h100, devices, workload, simulate_top=TREND_TOP)
      best = {m: next((p for p in ranked if p.candidate.mode == m), None)
              for m in ("colocated", "disagg")}
      gain = (best["disagg"].goodput_per_device / best["colocated"].goodput_per_device
              if best["disagg"] and best["colocated"] and best["colocated"].goodput > 0
              else None)
      rows.append({"model": model, "devices": devices, "dataset_name": name,
                   "mean_prompt": float(workload.prompt_lens.mean()),
                   "mean_output": float(workload.output_lens.mean()),
                   "colocated": best["colocated"] and best["colocated"].to_json(),
                   "disagg": best["disagg"] and best["disagg"].to_json(),
                   "disagg_over_colocated": gain, "configs_screened": screened,
                   "above_roofline": sum(p.above_roofline for p in ranked),
                   "plan_s": time.perf_counter() - start})
      print(f"{model} on {devices} x h100, {name}: disagg / colocated = "
            f"{gain if gain is None else round(gain, 2)} ({rows[-1]['plan_s']:.0f} s)")
  return {"slos": TREND_SLOS, "hardware": "h100", "rows": rows}


def _describe(c: dict) -> str:
  if c is None:
    return "-"
  if c["mode"] == "colocated":
    return (f"colocated TP{c['decode_tp']} x{c['replicas']}, chunk {c['chunk_batch']}x"
            f"{c['chunk_size']}")
  return (f"{c['num_prefill_workers']}P(TP{c['prefill_tp']}) {c['num_decode_workers']}D"
          f"(TP{c['decode_tp']}) x{c['replicas']}")


def markdown(result: dict) -> str:
  lines = []
  if "distserve" in result:
    d = result["distserve"]
    dis, col = d["setups"].values()
    pub_dis, pub_col = d["published_distserve_rate"], d["published_vllm_rate"]
    lines += ["| DistServe OPT-13B chatbot, A100, TTFT 0.25 s / TPOT 0.1 s, 90% attainment | "
              "published | ours | ours / published |", "| --- | --- | --- | --- |"]
    ratio = d["ratio_goodput"]
    lines.append(f"| DistServe / vLLM per-GPU rate | {d['published_ratio']}x | {ratio:.2f}x | "
                 f"{ratio / d['published_ratio']:.2f} |")
    lines.append(f"| DistServe (prefill TP2 + decode TP1), req/s per GPU | {pub_dis:.2f} | "
                 f"{dis['goodput_per_gpu']:.2f} | {dis['goodput_per_gpu'] / pub_dis:.2f} |")
    lines.append(f"| vLLM (TP1, no chunked prefill), req/s per GPU | {pub_col:.2f} | "
                 f"{col['goodput_per_gpu']:.2f} | {col['goodput_per_gpu'] / pub_col:.2f} |")
    lines += ["", "| setup | goodput per GPU (req/s) | roofline per GPU | p90 TTFT / TPOT at "
              "goodput (ms) | attainment at per-GPU " + ", ".join(
                  f"{r:g}" for r in d["rates_per_gpu"]) + " req/s |",
              "| --- | --- | --- | --- | --- |"]
    lines.append("| vLLM, published (artifact notebook) | 0.5 | | | "
                 + " ".join(f"{a}%" for a in d["published_vllm_curve"]) + " |")
    for label, s in d["setups"].items():
      at = s["at_goodput"] or {}
      lines.append(f"| {label} | {s['goodput_per_gpu']:.2f} | {s['roofline_per_gpu']:.2f} | "
                   f"{at.get('p90_ttft_ms', 0):.0f} / {at.get('p90_tpot_ms', 0):.1f} | "
                   + " ".join(f"{p['slo_attainment']:.0%}" + ("" if p["steady"] else "*")
                              for p in s["curve"]) + " |")
    best = d["planner_4xa100"]["best"]
    for mode in ("disagg", "colocated"):
      b = best[mode]
      if b:
        lines.append(f"| planner's best {mode} on 4 A100: {_describe(b)} | "
                     f"{b['goodput_per_device']:.2f} | "
                     f"{b['roofline_request_rate'] / b['devices']:.2f} | "
                     f"{b.get('p90_ttft_ms', 0):.0f} / {b.get('p90_tpot_ms', 0):.1f} | |")
    lines.append("")
  if "trends" in result:
    lines += ["| model, chips | workload | best colocated (req/s per chip) | best disaggregated "
              "(req/s per chip) | disagg / colocated |", "| --- | --- | --- | --- | --- |"]
    for row in result["trends"]["rows"]:
      col, dis = row["colocated"], row["disagg"]
      gain = row["disagg_over_colocated"]
      lines.append(
          f"| {row['model']}, {row['devices']} x H100 | {row['dataset_name']} | "
          + (f"{col['goodput_per_device']:.3g} ({_describe(col)})" if col else "-") + " | "
          + (f"{dis['goodput_per_device']:.3g} ({_describe(dis)})" if dis else "-") + " | "
          + (f"{gain:.2f}" if gain is not None else "-") + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  unknown = [e for e in FLAGS.experiments if e not in ("distserve", "trends")]
  if unknown:
    raise app.UsageError(f"--experiments={','.join(FLAGS.experiments)}: {', '.join(unknown)} "
                         "is not one of distserve, trends")
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir=DIR is needed (published.json and published.md go there)")
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  start = time.perf_counter()
  result = {"date": time.strftime("%Y-%m-%d"), "seed": FLAGS.seed}
  if "distserve" in FLAGS.experiments:
    result["distserve"] = distserve()
  if "trends" in FLAGS.experiments:
    result["trends"] = trends()
  result["seconds"] = time.perf_counter() - start
  with open(os.path.join(FLAGS.output_dir, "published.json"), "w") as f:
    json.dump(result, f, indent=1, default=lambda o: dataclasses.asdict(o))
  table = markdown(result)
  with open(os.path.join(FLAGS.output_dir, "published.md"), "w") as f:
    f.write(table)
  print(table)
  print(f"{result['seconds']:.0f} s")
  return 0


if __name__ == "__main__":
  app.run(main)
