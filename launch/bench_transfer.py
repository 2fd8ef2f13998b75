r"""KV transfer, side by side in one run: how much of it each `--config.engine.transfer` setting
leaves exposed after prefill, on the same prompts.

    python launch/bench_transfer.py --model_config=smollm2_135m --prompt_len=2048 \
        --num_prompts=4 --transfers=request,layers:4 --output_json=transfer.json \
        --plot=transfer.png

For each setting, one disaggregated engine (prefill on the first device, decode on the second)
serves the same batch of prompts (one prefill step), after a discarded warm-up round that
compiles. Per request it records, from the engine's transfer timeline (each KV piece's compute
and copy observed at device completion):
  prefill_ms          prefill start to the first token (the whole prefill step);
  exposed_ms          the first token to the last KV piece landing on the decode mesh: the part
                      of the transfer prefill did not hide (the benchmark's mean_transfer_ms);
  transfer_total_ms   the first piece's copy starting to the last landing;
  host_ms_per_copy    host time to dispatch one piece's copy;
  bytes               KV bytes moved (exactly the prompt's pages, every layer).
The ratios are exposed (each setting) / exposed (the first setting). --plot draws the timeline of
the first request of each setting: compute per layer group and the copies, against time.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("model_path", None, "A Hugging Face checkpoint directory.")
flags.DEFINE_string("model_config", "smollm2_135m",
                    "Without --model_path: a random-weight checkpoint of configs/models/NAME.py.")
flags.DEFINE_integer("prompt_len", 2048, "Tokens per prompt.")
flags.DEFINE_integer("num_prompts", 4, "Prompts, prefilled as one batch.")
flags.DEFINE_list("transfers", ["request", "layers:4"],
                  "The --config.engine.transfer settings to compare, the first the baseline.")
flags.DEFINE_integer("rounds", 2, "Timed rounds per setting (medians reported).")
flags.DEFINE_integer("num_cpu_devices", 2, "Simulated CPU devices: prefill on the first, decode "
                     "on the second.")
flags.DEFINE_string("output_json", None, "Write the figures here.")
flags.DEFINE_string("plot", None, "Write the timeline plot here (PNG).")
FLAGS = flags.FLAGS


def _request_figures(output) -> dict:
  m = output.metrics
  timeline = m.transfer_timeline
  return {"prefill_ms": (m.first_token - m.prefill_start) * 1e3,
          "exposed_ms": m.phases()["transfer"] * 1e3,
          "transfer_total_ms": (m.transfer_total() or 0.0) * 1e3,
          "host_ms_per_copy": statistics.median(p["host_s"] for p in timeline) * 1e3,
          "copies": len(timeline), "bytes": m.transfer_bytes()}


def _timeline(output) -> dict:
  """The first request's pieces relative to its prefill start (seconds): per group the compute
  end, per piece the copy's start and landing."""
  m = output.metrics
  t0 = m.prefill_start
  return {"first_token": m.first_token - t0,
          "pieces": [{k: (v - t0 if k in ("computed", "start", "landed") else v)
                      for k, v in p.items()} for p in m.transfer_timeline]}


def run_setting(model_dir, transfer: str, prompts, rounds: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from disagg_jax import parallel  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from disagg_jax.models import loading  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  prefill = loading.load_model(model_dir, parallel.make_mesh(devices[:1], 1))
  decode = loading.load_model(model_dir, parallel.make_mesh(devices[1:2], 1))
  longest = max(len(p) for p in prompts)
  config = EngineConfig(max_seq_len=longest + 16, prefill_batch=len(prompts),
                        max_prefill_tokens=len(prompts) * 2 * longest, decode_batch=len(prompts),
                        transfer=transfer, precompile_len=0)
  sampling = SamplingParams(max_new_tokens=2, ignore_eos=True)
  with Engine.create("disagg", prefill, decode, config=config, progress=False) as engine:
    engine.generate(prompts, sampling)  # compiles
    rounds_out, timeline, outputs_tokens = [], None, None
    for _ in range(rounds):
      outputs = engine.generate(prompts, sampling)
      rounds_out.append([_request_figures(o) for o in outputs])
      timeline = _timeline(outputs[0])
      outputs_tokens = [o.output_token_ids for o in outputs]
  figures = {key: statistics.median(r[key] for run in rounds_out for r in run)
             for key in rounds_out[0][0]}
  return {"transfer": transfer, **figures, "timeline": timeline, "tokens": outputs_tokens}


def plot(results, path: str) -> None:
  """Per setting: the prefill's layer groups (compute, blue) and the KV copies (orange, with a
  tick where each lands) over the whole prefill, and the same zoomed on the first token."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(results), 2, figsize=(11, 1.6 + 1.3 * len(results)),
                           squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
  for row, result in zip(axes, results):
    pieces = result["timeline"]["pieces"]
    first = result["timeline"]["first_token"] * 1e3
    groups = sorted({p["group"] for p in pieces})
    end_of = {g: max(p["computed"] for p in pieces if p["group"] == g) * 1e3 for g in groups}
    # The host saw the prefill end when it read the first token (the landing thread may see a
    # group's KV ready later than it was, when it is still waiting on an earlier copy).
    end_of[groups[-1]] = min(end_of[groups[-1]], first)
    last = max(max(p["landed"] for p in pieces) * 1e3, first)
    for zoom, ax in enumerate(row):
      for g in groups:
        start = end_of.get(g - 1, 0.0)
        ax.barh(1, end_of[g] - start, left=start, height=0.6, color="tab:blue",
                edgecolor="white")
      for p in pieces:
        ax.barh(0, (p["landed"] - p["start"]) * 1e3, left=p["start"] * 1e3, height=0.6,
                color="tab:orange")
        ax.plot([p["landed"] * 1e3] * 2, [-0.35, 0.35], color="tab:red", lw=1)
      ax.axvline(first, color="black", lw=1, ls="--")
      ax.set_yticks([0, 1], ["KV copies", "prefill\n(layer groups)"])
      if zoom:
        span = max(last - first, 1.0)
        ax.set_xlim(first - 2 * span, last + span)
        ax.set_title("zoom on the first token", fontsize=9, loc="left")
      else:
        ax.set_title(f"--config.engine.transfer={result['transfer']}: exposed "
                     f"{result['exposed_ms']:.1f} ms (first token to last copy landed)",
                     fontsize=9, loc="left")
  for ax in axes[-1]:
    ax.set_xlabel("ms since prefill start (dashed: first token; red: a copy lands)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  if len(jax.devices()) < 2:
    raise app.UsageError(f"need two devices (prefill, decode); have {len(jax.devices())} "
                         "(--num_cpu_devices on CPU)")
  from disagg_jax.testing import checkpoints  # pylint: disable=g-import-not-at-top
  from disagg_jax.transfer.pieces import parse_transfer  # pylint: disable=g-import-not-at-top
  for spec in FLAGS.transfers:
    try:
      parse_transfer(spec, 1)
    except ValueError as e:
      raise app.UsageError(str(e).replace("--config.engine.transfer", "--transfers")) from None
  model_dir = FLAGS.model_path or checkpoints.random_checkpoint(FLAGS.model_config)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from disagg_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  vocab = ModelConfig.from_dir(model_dir).vocab_size
  prompts = [[int(t) for t in rng.integers(3, vocab, FLAGS.prompt_len)]
             for _ in range(FLAGS.num_prompts)]
  results = []
  for spec in FLAGS.transfers:
    start = time.perf_counter()
    results.append(run_setting(model_dir, spec, prompts, FLAGS.rounds))
    print(f"{spec}: prefill {results[-1]['prefill_ms']:.1f} ms, exposed transfer "
          f"{results[-1]['exposed_ms']:.2f} ms, total {results[-1]['transfer_total_ms']:.2f} ms, "
          f"{results[-1]['copies']} copies of {results[-1]['host_ms_per_copy']:.3f} ms host each,"
          f" {results[-1]['bytes'] / 1e6:.1f} MB ({time.perf_counter() - start:.0f} s)")
  base = results[0]
  same = all(r["tokens"] == base["tokens"] for r in results)
  for r in results[1:]:
    r["exposed_ratio"] = r["exposed_ms"] / base["exposed_ms"] if base["exposed_ms"] else None
    print(f"{r['transfer']} / {base['transfer']}: exposed transfer x"
          f"{r['exposed_ratio']:.3f}" if r["exposed_ratio"] is not None else
          f"{r['transfer']}: baseline exposed nothing")
  print(f"greedy tokens identical across settings: {same}")
  report = {"model": FLAGS.model_path or f"{FLAGS.model_config} (random weights)",
            "date": time.strftime("%Y-%m-%d %H:%M"), "device": jax.devices()[0].device_kind,
            "prompt_len": FLAGS.prompt_len, "num_prompts": FLAGS.num_prompts,
            "tokens_identical": same,
            "results": [{k: v for k, v in r.items() if k != "tokens"} for r in results]}
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)
  if FLAGS.plot:
    plot(results, FLAGS.plot)
  return 0 if same else 1


if __name__ == "__main__":
  app.run(main)
