"""Benchmark workloads: what each request sends and how many tokens it asks for.

`random` (vLLM's): input and output lengths drawn uniformly from [len * (1 - r), len * (1 + r)];
`sharegpt`: the first human/assistant turn of each conversation in a ShareGPT JSON file, filtered
as vLLM does (prompts or completions under 4 tokens dropped, prompts over 1024 and pairs over 2048
tokens dropped); `prefill_heavy` and `decode_heavy`: `random` presets. Built with a grain pipeline
and seeded, so a (workload, seed) pair always yields the same requests.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import grain
import numpy as np

DATASETS = ("random", "sharegpt", "prefill_heavy", "decode_heavy")
# (input_len, output_len, range_ratio): long prompts with short answers, and the opposite.
PRESETS = {"prefill_heavy": (384, 16, 0.25), "decode_heavy": (32, 192, 0.25)}
# vLLM's random defaults are 1024 / 128; ours fit the demo model's context.
RANDOM_DEFAULTS = (256, 64, 0.0)
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT = 1024
SHAREGPT_MAX_TOTAL = 2048


class WorkloadError(ValueError):
  """A workload that cannot run, naming the value and the limit."""


@dataclasses.dataclass(frozen=True)
class BenchRequest:
  prompt_token_ids: list[int]
  output_len: int


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int, first_id: int = 0) -> list[BenchRequest]:
  """`num` requests of random token ids in [first_id, vocab_size)."""
  if not 0 <= range_ratio < 1:
    raise WorkloadError(f"--random_range_ratio={range_ratio} must be in [0, 1)")
  if input_len < 1 or output_len < 1:
    raise WorkloadError(f"--random_input_len={input_len} and --random_output_len={output_len} "
                        "must be at least 1")

  def bounds(n):
    return max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio)))

  (in_lo, in_hi), (out_lo, out_hi) = bounds(input_len), bounds(output_len)

  def make(i):
    rng = np.random.default_rng([seed, i])
    n_in = int(rng.integers(in_lo, in_hi + 1))
    return BenchRequest([int(t) for t in rng.integers(first_id, vocab_size, n_in)],
                        int(rng.integers(out_lo, out_hi + 1)))

  return list(grain.MapDataset.range(num).map(make))


def load_sharegpt(path: str) -> list[tuple[str, str]]:
  """(prompt, completion) of each conversation's first human/assistant turn pair."""
  if not path:
    raise WorkloadError("--dataset_name=sharegpt needs --dataset_path=FILE.json")
  if not os.path.exists(path):
    raise WorkloadError(f"--dataset_path={path} does not exist")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WorkloadError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, list):
    raise WorkloadError(f"{path} must hold a JSON list of conversations, got "
                        f"{type(data).__name__}")
  pairs = []
  for i, entry in enumerate(data):
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
      raise WorkloadError(f"{path}: entry {i} has no 'conversations' list")
    if len(turns) < 2:
      continue
    try:
      pairs.append((str(turns[0]["value"]), str(turns[1]["value"])))
    except (KeyError, TypeError):
      raise WorkloadError(f"{path}: entry {i}'s turns need a 'value'") from None
  return pairs


def sharegpt_requests(path: str, num: int, tokenizer, seed: int) -> list[BenchRequest]:
  pairs = load_sharegpt(path)

  def tokenize(pair):
    prompt, completion = pair
    return BenchRequest(tokenizer.encode(prompt), len(tokenizer.encode(completion)))

  def keep(r: BenchRequest):
    n_in = len(r.prompt_token_ids)
    return (n_in >= SHAREGPT_MIN_LEN and r.output_len >= SHAREGPT_MIN_LEN
            and n_in <= SHAREGPT_MAX_PROMPT and n_in + r.output_len <= SHAREGPT_MAX_TOTAL)

  dataset = grain.MapDataset.source(pairs).shuffle(seed=seed).map(tokenize).filter(keep)
  requests = [r for r in dataset if r is not None][:num]
  if len(requests) < num:
    raise WorkloadError(f"{path} yields {len(requests)} usable conversations after filtering; "
                        f"--num_prompts={num} asked for more")
  return requests


def build(dataset_name: str, *, num_prompts: int, vocab_size: int, tokenizer, seed: int,
          dataset_path: str | None = None, input_len: int | None = None,
          output_len: int | None = None, range_ratio: float | None = None,
          first_id: int = 0) -> list[BenchRequest]:
  """The requests of a workload. Presets take their lengths from PRESETS unless given."""
  if dataset_name not in DATASETS:
    raise WorkloadError(f"--dataset_name={dataset_name!r} is not one of {', '.join(DATASETS)}")
  if num_prompts < 1:
    raise WorkloadError(f"--num_prompts={num_prompts} must be at least 1")
  if dataset_name == "sharegpt":
    return sharegpt_requests(dataset_path, num_prompts, tokenizer, seed)
  defaults = PRESETS.get(dataset_name, RANDOM_DEFAULTS)
  return random_requests(num_prompts, input_len or defaults[0], output_len or defaults[1],
                         defaults[2] if range_ratio is None else range_ratio, vocab_size, seed,
                         first_id)


def check_limits(requests: Sequence[BenchRequest], max_seq_len: int,
                 max_prefill_length: int) -> None:
  """Every request must fit the engine; fail before anything runs."""
  longest_prompt = max(len(r.prompt_token_ids) for r in requests)
  if longest_prompt > max_prefill_length:
    raise WorkloadError(f"the workload has a {longest_prompt}-token prompt; max_prefill_length "
                        f"is {max_prefill_length} (lower --random_input_len or raise "
                        "--config.engine.max_prefill_length)")
  longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
  if longest > max_seq_len:
    raise WorkloadError(f"the workload has a request of {longest} tokens (prompt + output); "
                        f"max_seq_len is {max_seq_len} (lower the lengths or raise "
                        "--config.engine.max_seq_len)")
