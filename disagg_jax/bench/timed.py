"""Workloads whose arrival times are part of the workload: traffic that shifts, and traces.

`shifting` (`--dataset_name=shifting --shifting_phases=prefill_heavy:20,decode_heavy:20:8`): phases
of given durations, each a length workload (`workloads.LENGTH_DATASETS`: prefill_heavy,
decode_heavy, random, chat, 1k_1k, ...) arriving as a gamma process (`--burstiness`) at its own
rate (the third field, requests/s) or `--request_rate`; the phases follow one another, so the
mix of prompt and output lengths changes at each boundary.

`trace` (`--dataset_name=trace --dataset_path=F`): replays a recorded trace of arrival time, input
length and output length, in the shape of the public Azure LLM inference traces: a CSV with a
header (`TIMESTAMP,ContextTokens,GeneratedTokens`, or `arrival_time,input_len,output_len`; any
order, case-insensitive; timestamps in seconds or as date-times) or JSONL objects with the same
keys. Times are made relative to the first request; prompts are random token ids of the given
lengths. `configs/traces/sample.csv` is a small generated one at the demo model's scale
(`sample_trace`, written by `write_trace`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
import re

import numpy as np

from disagg_jax.bench.workloads import (LENGTH_DATASETS, BenchRequest, WorkloadError,
                                        preset_lengths)

DEFAULT_PHASES = "prefill_heavy:20,decode_heavy:20,random:20"
TIME_KEYS = ("timestamp", "arrival_time", "arrival", "time")
INPUT_KEYS = ("contexttokens", "input_len", "input_tokens", "prompt_tokens", "prompt_len")
OUTPUT_KEYS = ("generatedtokens", "output_len", "output_tokens", "completion_tokens")


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str  # a length workload
  duration: float  # seconds
  rate: float | None = None  # requests/s; None: --request_rate


def parse_phases(spec: str) -> list[Phase]:
  """`name:seconds[:rate],...` -> phases; a bad field raises WorkloadError naming it."""
  phases = []
  for part in (spec or "").split(","):
    fields = part.strip().split(":")
    if len(fields) not in (2, 3) or not fields[0]:
      raise WorkloadError(f"--shifting_phases: {part.strip()!r} is not name:seconds[:rate] "
                          f"(e.g. {DEFAULT_PHASES})")
    name = fields[0]
    if name not in LENGTH_DATASETS:
      raise WorkloadError(f"--shifting_phases: {name!r} is not one of "
                          f"{', '.join(LENGTH_DATASETS)}")
    try:
      numbers = [float(f) for f in fields[1:]]
    except ValueError:
      raise WorkloadError(f"--shifting_phases: {part.strip()!r} has a field that is not a "
                          "number") from None
    if not all(math.isfinite(x) and x > 0 for x in numbers):
      raise WorkloadError(f"--shifting_phases: {part.strip()!r}: seconds and rate must be "
                          "positive")
    phases.append(Phase(name, numbers[0], numbers[1] if len(numbers) == 2 else None))
  return phases


def _draw(num: int, lengths: tuple, vocab_size: int, rng, first_id: int) -> list[BenchRequest]:
  prompt_lens, output_lens = lengths
  return [BenchRequest([int(t) for t in rng.integers(first_id, vocab_size, int(prompt_lens[i]))],
                       int(output_lens[i])) for i in range(num)]


def shifting(phases: list[Phase], *, request_rate: float, burstiness: float, vocab_size: int,
             seed: int, first_id: int = 0) -> tuple[list[BenchRequest], np.ndarray]:
  """(requests, arrival times) of the phases, one after the other."""
  if not phases:
    raise WorkloadError("--shifting_phases is empty")
  requests, times, start = [], [], 0.0
  for k, phase in enumerate(phases):
    rate = phase.rate or request_rate
    if not math.isfinite(rate) or rate <= 0 or not burstiness > 0:
      raise WorkloadError(f"phase {phase.name}: --request_rate={rate} and --burstiness="
                          f"{burstiness} must be positive and finite for --dataset_name=shifting")
    rng = np.random.default_rng([seed, 11, k])
    arrivals = []
    t = start + float(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
    while t < start + phase.duration:
      arrivals.append(t)
      t += float(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
    if arrivals:
      lengths = preset_lengths(phase.name, len(arrivals), seed + 1000 * (k + 1))
      requests += _draw(len(arrivals), lengths, vocab_size, rng, first_id)
      times += arrivals
    start += phase.duration
  if not requests:
    raise WorkloadError("--shifting_phases: no request arrives in any phase (raise the rates "
                        "or the durations)")
  return requests, np.asarray(times)


def phase_bounds(phases: list[Phase]) -> list[list]:
  """[[name, start s, end s], ...]: the phases' place in time (for the benchmark JSON)."""
  out, start = [], 0.0
  for phase in phases:
    out.append([phase.name, start, start + phase.duration])
    start += phase.duration
  return out


def _seconds(value: str, where: str) -> float:
  try:
    return float(value)
  except ValueError:
    pass
  # A date-time; Azure's traces carry 7 fractional digits, Python parses at most 6.
  text = re.sub(r"(\.\d{6})\d+", r"\1", value.strip())
  try:
    return datetime.datetime.fromisoformat(text).timestamp()
  except ValueError:
    raise WorkloadError(f"{where}: {value!r} is neither seconds nor a date-time") from None


def _pick(record: dict, keys: tuple, what: str, where: str) -> str:
  lowered = {str(k).strip().lower(): v for k, v in record.items()}
  for key in keys:
    if key in lowered and lowered[key] not in (None, ""):
      return lowered[key]
  raise WorkloadError(f"{where}: no {what} column (one of {', '.join(keys)})")


def read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(arrival seconds from the first request, input lengths, output lengths), in time order."""
  if not path:
    raise WorkloadError("--dataset_name=trace needs --dataset_path=F (a CSV or JSONL trace)")
  if not os.path.exists(path):
    raise WorkloadError(f"--dataset_path={path}: no such file")
  rows = []
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl") or path.endswith(".json"):
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append((f"{path}:{n}", json.loads(line)))
          except json.JSONDecodeError as e:
            raise WorkloadError(f"{path}:{n}: not JSON ({e.msg})") from None
    else:
      rows = [(f"{path}:{n}", r) for n, r in enumerate(csv.DictReader(f), 2)]
  if not rows:
    raise WorkloadError(f"--dataset_path={path}: the trace has no requests")
  times, ins, outs = [], [], []
  for where, record in rows:
    if not isinstance(record, dict):
      raise WorkloadError(f"{where}: expected an object with arrival time and lengths")
    times.append(_seconds(str(_pick(record, TIME_KEYS, "arrival time", where)), where))
    for keys, what, into in ((INPUT_KEYS, "input length", ins), (OUTPUT_KEYS, "output length",
                                                                  outs)):
      value = _pick(record, keys, what, where)
      try:
        number = int(float(value))
      except ValueError:
        raise WorkloadError(f"{where}: {what} {value!r} is not a number") from None
      if number < 1:
        raise WorkloadError(f"{where}: {what} {number} must be at least 1")
      into.append(number)
  times = np.asarray(times, np.float64)
  order = np.argsort(times, kind="stable")
  return (times[order] - times[order][0], np.asarray(ins, np.int64)[order],
          np.asarray(outs, np.int64)[order])


def trace(path: str, *, num: int | None, vocab_size: int, seed: int,
          first_id: int = 0) -> tuple[list[BenchRequest], np.ndarray]:
  """(requests, arrival times) of a trace's first `num` requests (None: all)."""
  times, ins, outs = read_trace(path)
  n = len(times) if not num else min(num, len(times))
  rng = np.random.default_rng([seed, 12])
  return _draw(n, (ins, outs), vocab_size, rng, first_id), times[:n]


def write_trace(path: str, times, input_lens, output_lens) -> None:
  """A trace CSV in the Azure traces' columns (TIMESTAMP in seconds)."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    for t, i, o in zip(times, input_lens, output_lens):
      writer.writerow([f"{float(t):.3f}", int(i), int(o)])


def sample_trace(num: int = 120, seed: int = 0, max_total: int = 480):
  """(times, input lengths, output lengths) of a synthetic trace at the demo model's scale, with
  what real traces show: a rate that swings (between ~0.5 and ~3.5 requests/s over a minute),
  bursts, and heavy-tailed lengths whose mix drifts from long prompts to long answers."""
  rng = np.random.default_rng([seed, 13])
  times, t = [], 0.0
  while len(times) < num:
    rate = 2.0 + 1.5 * math.sin(2 * math.pi * t / 60.0)
    t += float(rng.gamma(0.5, 1.0 / (rate * 0.5)))  # burstier than Poisson
    times.append(t)
  drift = np.linspace(0.0, 1.0, num)  # 0: prefill-heavy, 1: decode-heavy
  ins = np.round(np.exp(rng.normal(np.log(300) * (1 - drift) + np.log(40) * drift, 0.4)))
  outs = np.round(np.exp(rng.normal(np.log(16) * (1 - drift) + np.log(150) * drift, 0.4)))
  ins = np.clip(ins, 4, max_total - 8).astype(np.int64)
  outs = np.clip(outs, 4, None).astype(np.int64)
  outs = np.minimum(outs, max_total - ins)
  return np.asarray(times), ins, outs
