"""Printing and saving benchmark results."""

from __future__ import annotations

import json

from disagg_jax.bench.metrics import LATENCIES, PHASES

_NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
          "itl": "Inter-token Latency", "decode_itl": "Decode ITL (excl. each first gap)",
          "e2el": "End-to-end Latency"}


def format_table(result: dict, title: str = "Serving Benchmark Result") -> str:
  lines = [f"{' ' + title + ' ':=^60}"]

  def row(label, value, fmt="{:.2f}"):
    lines.append(f"{label:<44}{fmt.format(value) if value is not None else 'n/a':>16}")

  row("Successful requests:", result["completed"], "{}")
  row("Failed requests:", result["failed"], "{}")
  row("Benchmark duration (s):", result["duration"])
  row("Total input tokens:", result["total_input_tokens"], "{}")
  row("Total generated tokens:", result["total_output_tokens"], "{}")
  row("Request throughput (req/s):", result["request_throughput"])
  row("Request goodput (req/s):", result["request_goodput"])
  row("SLO attainment:", result["slo_attainment"], "{:.1%}")
  row("Output token throughput (tok/s):", result["output_throughput"])
  row("Total token throughput (tok/s):", result["total_token_throughput"])
  if "prefix_cache_hit_rate" in result:
    row("Prefix cache hit rate:", result["prefix_cache_hit_rate"], "{:.1%}")
    row("Mean prompt tokens cached / computed:", None)
    lines[-1] = (lines[-1][:44] + f"{result['mean_cached_prompt_tokens']:>8.1f}/"
                 f"{result['mean_computed_prompt_tokens']:>7.1f}")
  for key in LATENCIES + ("decode_itl",):
    lines.append(f"{_NAMES[key]:-^60}")
    for stat in ("mean", "median", "p90", "p99"):
      row(f"{stat.capitalize()} {key.upper()} (ms):", result[f"{stat}_{key}_ms"])
  lines.append(f"{'Per-request phases (mean / p99 ms)':-^60}")
  for phase in PHASES:
    lines.append(f"{phase:<44}{result[f'mean_{phase}_ms']:>8.1f}/{result[f'p99_{phase}_ms']:>7.1f}")
  lines.append("=" * 60)
  return "\n".join(lines)


def write_json(path: str, result: dict) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


def write_records(path: str, records) -> None:
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record.to_json()) + "\n")
