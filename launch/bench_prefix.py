r"""Prefix caching, side by side in one run: the same shared-prefix workload with
`--config.engine.prefix_caching` off and on, in each mode.

    python launch/bench_prefix.py --num_cpu_devices=8 --modes=colocated,disagg:prefill \
        --devices=4 --prefill_devices=2 --decode_devices=2 --dataset_name=multiturn \
        --num_prompts=160 --request_rate=4 --output_json=prefix.json

For each mode, one engine per setting (off first, then on) on the mesh flags of that mode serves
a warm-up (the workload drawn with another seed, all at once, twice: it compiles the same
shapes, cache hits' included, and shares no prefix with the measured run), then the workload with the same arrivals. Per setting: median and mean TTFT, prompt tokens computed (prompt tokens
minus those found cached) in all and per request, the hit rate, output throughput; per mode the
ratios on / off, and whether every request's greedy tokens were the same. `--repeats` runs the
pair again (alternating off and on) and reports the medians of the runs.

Disaggregated, where the cache lives is chosen per entry of `--modes`: `disagg` takes the engine
flags as given; `disagg:prefill` caches on the prefill mesh only
(`--config.engine.prefill_cache_tokens`, default here 4096 when not given), `disagg:decode` on the
decode mesh only (`--config.engine.decode_prefill_tokens`, default here chunk_size), and
`disagg:both` both. Entries of one mode share one caching-off run.

With `--cluster=ray` and several prefill workers, `--routings=prefix,round_robin` runs each
entry's caching-on setting once per `--config.engine.routing` (named `ENTRY/ROUTING`):

    python launch/bench_prefix.py --cluster=ray --num_prefill_workers=2 --num_decode_workers=1 \
        --prefill_devices=1 --decode_devices=1 --modes=disagg:prefill \
        --routings=prefix,round_robin --output_json=routing.json
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

from disagg_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

cli.define_engine_flags()
cli.define_workload_flags()
flags.FLAGS.set_default("dataset_name", "multiturn")
flags.FLAGS.set_default("num_prompts", 160)
flags.FLAGS.set_default("request_rate", 4.0)
flags.DEFINE_list("modes", ["colocated", "disagg"],
                  "Engine modes to compare in (each off/on): colocated, disagg, or disagg:prefill "
                  "| disagg:decode | disagg:both (where the disaggregated cache lives).")
flags.DEFINE_list("routings", [],
                  "--cluster=ray: run each entry's caching-on setting under each of these "
                  "--config.engine.routing values (default: the config's one).")
flags.DEFINE_integer("repeats", 1, "Off/on pairs per mode (medians reported).")
flags.DEFINE_integer("warmup_prompts", 32,
                     "Requests of the workload drawn with another seed, served first by each "
                     "engine (compiles; shares no prefix with the measured run).")
flags.DEFINE_string("output_json", None, "Write the figures here.")
FLAGS = flags.FLAGS

KEYS = ("median_ttft_ms", "mean_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "output_throughput",
        "prefix_cache_hit_rate", "mean_cached_prompt_tokens", "mean_computed_prompt_tokens")


PLACES = {"prefill": (True, False), "decode": (False, True), "both": (True, True)}


def place_cache(entry: str) -> str:
  """Sets the engine flags of a `--modes` entry (see the module docstring); its mode."""
  mode, _, place = entry.partition(":")
  if mode not in ("colocated", "disagg") or (place and (mode != "disagg" or place not in PLACES)):
    raise app.UsageError(f"--modes has {entry!r}; each must be colocated, disagg or disagg:"
                         f"{'|'.join(PLACES)}")
  if place:
    engine, given = FLAGS.config.engine, place_cache.given
    prefill, decode = PLACES[place]
    engine.prefill_cache_tokens = (given["prefill_cache_tokens"] if given[
        "prefill_cache_tokens"] > 0 else 4096) if prefill else 0
    engine.decode_prefill_tokens = (given["decode_prefill_tokens"] if given[
        "decode_prefill_tokens"] > 0 else engine.chunk_size) if decode else 0
  return mode


def run_setting(mode: str, caching: bool, requests, arrivals, warmup) -> tuple[dict, list]:
  from disagg_jax.bench import metrics, runner  # pylint: disable=g-import-not-at-top
  FLAGS.mode = mode
  FLAGS.config.engine.prefix_caching = caching
  engine = cli.build_engine(FLAGS.config)
  try:
    for _ in range(2):  # the second time its prefixes are cached: cache-hit shapes compile too
      runner.run(engine, warmup, [0.0] * len(warmup), progress=False)
    records, duration = runner.run(engine, requests, arrivals, seed=FLAGS.seed, progress=False)
  finally:
    engine.shutdown()
  out = metrics.compute(records, duration)
  out["computed_prompt_tokens"] = sum(r.prompt_len - r.cached_tokens for r in records)
  out["failed"] = sum(not r.success for r in records)
  return out, [r.output_token_ids for r in records]


def main(argv):
  del argv
  cli.setup_jax()
  place_cache.given = {k: FLAGS.config.engine[k]
                       for k in ("prefill_cache_tokens", "decode_prefill_tokens")}
  for entry in FLAGS.modes:
    place_cache(entry)
  try:
    requests, arrivals, _ = cli.workload_from_flags(FLAGS.config)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # The warm-up: the same workload drawn with another seed (other prefixes: nothing of it is
  # reused by the measured run), all at once, so both settings compile the same shapes first.
  seed, num = FLAGS.seed, FLAGS.num_prompts
  FLAGS.seed, FLAGS.num_prompts = seed + 1000, FLAGS.warmup_prompts
  warmup, _, _ = cli.workload_from_flags(FLAGS.config)
  FLAGS.seed, FLAGS.num_prompts = seed, num
  report = {"date": time.strftime("%Y-%m-%d %H:%M"), "dataset_name": FLAGS.dataset_name,
            "num_prompts": FLAGS.num_prompts, "request_rate": FLAGS.request_rate,
            "model": FLAGS.model_path or "demo", "modes": {}}
  baseline = {}  # mode -> its caching-off runs and tokens, shared by its entries
  routings = FLAGS.routings or [FLAGS.config.engine.routing]
  for entry, routing in [(e, r) for e in FLAGS.modes for r in routings]:
    mode = place_cache(entry)
    FLAGS.config.engine.routing = routing
    entry = entry if len(routings) == 1 else f"{entry}/{routing}"
    runs = {False: [], True: []}
    tokens = {}
    for i in range(FLAGS.repeats):
      for caching in (False, True):
        if not caching and mode in baseline and i < len(baseline[mode][0]):
          runs[False].append(baseline[mode][0][i])
          tokens[False] = baseline[mode][1]
          continue
        start = time.perf_counter()
        result, tokens[caching] = run_setting(mode, caching, requests, arrivals, warmup)
        runs[caching].append(result)
        if not caching:
          baseline.setdefault(mode, ([], tokens[False]))[0].append(result)
        print(f"{entry} prefix_caching={caching}: median TTFT {result['median_ttft_ms']:.1f} ms, "
              f"computed {result['computed_prompt_tokens']} prompt tokens, hit rate "
              f"{result['prefix_cache_hit_rate']:.3f}, {result['failed']} failed "
              f"({time.perf_counter() - start:.0f} s)")
    med = {c: {k: statistics.median(r[k] for r in runs[c])
               for k in KEYS + ("computed_prompt_tokens",)} for c in runs}
    ratios = {k: med[True][k] / med[False][k] if med[False][k] else None
              for k in ("median_ttft_ms", "mean_ttft_ms", "p90_ttft_ms", "median_tpot_ms",
                        "output_throughput", "computed_prompt_tokens")}
    same = tokens[False] == tokens[True]
    report["modes"][entry] = {"off": med[False], "on": med[True], "on_over_off": ratios,
                             "tokens_identical": same, "runs": {"off": runs[False],
                                                                "on": runs[True]}}
    print(f"{entry}: on / off: median TTFT x{ratios['median_ttft_ms']:.3f}, prompt tokens "
          f"computed x{ratios['computed_prompt_tokens']:.3f}; greedy tokens identical: {same}")
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)
  return 0 if all(m["tokens_identical"] for m in report["modes"].values()) else 1


if __name__ == "__main__":
  cli.run(main)
