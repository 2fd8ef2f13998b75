"""Benchmark workloads: what each request sends and how many tokens it asks for.

`random` (vLLM's): input and output lengths drawn uniformly from [len * (1 - r), len * (1 + r)];
`sharegpt`: the first human/assistant turn of each conversation in a ShareGPT JSON file, filtered
as vLLM does (prompts or completions under 4 tokens dropped, prompts over 1024 and pairs over 2048
tokens dropped); `prefill_heavy` and `decode_heavy`: `random` presets at the demo model's scale
(its 512-token context: the CPU results in docs/BENCHMARKS.md use them).

Real-scale presets, for real-size models and accelerator plans (SCALED_PRESETS, CHAT):
`1k_1k`, `4k_256`, `8k_128`: the input / output lengths of the published grids (InferenceMAX,
NVIDIA's disaggregation studies), each length uniform within +-10%; `chat`: ShareGPT-like
conversations without the dataset file, lognormal prompt and output lengths (independent; pairs
of 2,048 tokens or more redrawn, as DistServe filters ShareGPT) with means 755 and 200 tokens,
the ShareGPT averages DistServe reports (its Figure 7; multi-turn prompts, OPT tokenizer).
`preset_lengths` draws any preset's lengths without token ids (the planner needs only lengths).

Workloads with shared prefixes, for prefix caching (`multiturn_requests`, PREFIX_DEFAULTS):
`multiturn`: conversations of `turns` turns, each starting with one of `num_prefixes` system
prompts of `prefix_len` tokens; every turn adds a user message of `turn_len` tokens, and the next
turn's prompt is the whole history: the earlier prompts, their answers (the workload's own
recorded answers, of the output length, as a replayed chat trace has them; the model's actual
answers differ, so their pages are computed anew) and a new message. Turn k + 1 arrives an
exponential think time (mean `think_time` s) after turn k did (open loop: it does not wait for
turn k's answer); conversations start at `request_rate / turns`
(`arrivals.conversation_arrivals`), so requests arrive at about `request_rate`. `documents`:
the same with one turn: questions of `turn_len` tokens about one of `num_prefixes` documents of
`prefix_len` tokens.

Built with a grain pipeline and seeded, so a (workload, seed) pair always yields the same
requests, and the first n requests of a larger draw are the n of a smaller one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

# (input_len, output_len, range_ratio): long prompts with short answers, and the opposite, at the
# demo model's scale.
PRESETS = {"prefill_heavy": (384, 16, 0.25), "decode_heavy": (32, 192, 0.25)}
# The same at a real model's scale: the grids of the published studies.
SCALED_PRESETS = {"1k_1k": (1024, 1024, 0.1), "4k_256": (4096, 256, 0.1),
                  "8k_128": (8192, 128, 0.1)}
# ShareGPT-like chat: lognormal lengths (median, sigma before the filter), pairs of
# CHAT_MAX_TOTAL tokens or more redrawn, each length at least SHAREGPT_MIN_LEN; the medians are
# set so the kept requests average CHAT_MEANS (755 prompt / 200 output tokens).
CHAT_MEANS = (755, 200)
CHAT_LOGNORMAL = ((771.5, 0.8), (138.8, 1.0))
CHAT_MAX_TOTAL = 2048
# Shared-prefix workloads at the demo model's scale: (turns, prefix_len, num_prefixes, turn_len,
# output_len, think_time seconds); the --multiturn_* flags override each.
PREFIX_DEFAULTS = {"multiturn": (4, 128, 4, 32, 16, 1.0), "documents": (1, 320, 4, 32, 16, 0.0)}
PREFIX_FIELDS = ("turns", "prefix_len", "num_prefixes", "turn_len", "output_len", "think_time")
# Workloads whose arrival times are their own (`bench.timed`): shifting phases, trace replay.
TIMED_DATASETS = ("shifting", "trace")
DATASETS = ("random", "sharegpt", "prefill_heavy", "decode_heavy", "chat", *SCALED_PRESETS,
            *PREFIX_DEFAULTS, *TIMED_DATASETS)
# Length-only presets (no dataset file): what plan.py and the analytic model accept.
LENGTH_DATASETS = tuple(d for d in DATASETS if d != "sharegpt" and d not in PREFIX_DEFAULTS
                        and d not in TIMED_DATASETS)
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
  # Shared-prefix workloads: the conversation this turn belongs to (-1: none) and its arrival
  # after the conversation's first turn, in seconds.
  conversation: int = -1
  offset: float = 0.0


def multiturn_requests(num: int, *, turns: int, prefix_len: int, num_prefixes: int,
                       turn_len: int, output_len: int, think_time: float, vocab_size: int,
                       seed: int, first_id: int = 0) -> list[BenchRequest]:
  """`num` requests (turns) of conversations sharing system prompts (see the module
  docstring), in conversation order; `arrivals.conversation_arrivals` times them."""
  for name, value, low in (("turns", turns, 1), ("prefix_len", prefix_len, 0),
                           ("num_prefixes", num_prefixes, 1), ("turn_len", turn_len, 1),
                           ("output_len", output_len, 1)):
    if value < low:
      flag = "random_output_len" if name == "output_len" else f"multiturn_{name}"
      raise WorkloadError(f"--{flag}={value} must be at least {low}")
  if think_time < 0:
    raise WorkloadError(f"--multiturn_think_time={think_time} must be >= 0")
  rng = np.random.default_rng([seed, 7])
  draw = lambda n: [int(t) for t in rng.integers(first_id, vocab_size, n)]
  prefixes = [draw(prefix_len) for _ in range(num_prefixes)]
  requests = []
  conversation = 0
  while len(requests) < num:
    history, offset = list(prefixes[rng.integers(num_prefixes)]), 0.0
    for _ in range(min(turns, num - len(requests))):
      history += draw(turn_len)
      requests.append(BenchRequest(list(history), output_len, conversation, offset))
      history += draw(output_len)  # the recorded answer
      offset += float(rng.exponential(think_time)) if think_time else 0.0
    conversation += 1
  return requests


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
  import grain  # pylint: disable=g-import-not-at-top

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

  import grain  # pylint: disable=g-import-not-at-top
  dataset = grain.MapDataset.source(pairs).shuffle(seed=seed).map(tokenize).filter(keep)
  requests = [r for r in dataset if r is not None][:num]
  if len(requests) < num:
    raise WorkloadError(f"{path} yields {len(requests)} usable conversations after filtering; "
                        f"--num_prompts={num} asked for more")
  return requests


_BLOCK = 1024  # lengths are drawn in blocks, so a larger draw starts with a smaller one


def _blocks(seed: int, tag: int, num: int, draw) -> tuple[np.ndarray, np.ndarray]:
  """(prompt lengths, output lengths): `draw(rng)` -> the kept (prompt, output) arrays of one
  block, blocks drawn from a generator keyed by (seed, tag, block index) until `num` are kept."""
  prompts, outputs, kept, block = [], [], 0, 0
  while kept < num:
    p, o = draw(np.random.default_rng([seed, tag, block]))
    prompts.append(p)
    outputs.append(o)
    kept += len(p)
    block += 1
    if block > 1000 and kept == 0:
      raise WorkloadError("the workload's length filter rejects every request")
  return (np.concatenate(prompts)[:num].astype(np.int64),
          np.concatenate(outputs)[:num].astype(np.int64))


def _check_lengths(input_len, output_len, range_ratio) -> None:
  if not 0 <= range_ratio < 1:
    raise WorkloadError(f"--random_range_ratio={range_ratio} must be in [0, 1)")
  if input_len < 1 or output_len < 1:
    raise WorkloadError(f"--random_input_len={input_len} and --random_output_len={output_len} "
                        "must be at least 1")


def preset_lengths(dataset_name: str, num: int, seed: int, input_len: int | None = None,
                   output_len: int | None = None,
                   range_ratio: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(prompt lengths, output lengths) of `num` requests of a length-only workload
  (LENGTH_DATASETS), the same as `build` gives for the same arguments. For `chat`,
  `input_len` / `output_len` rescale the mean lengths (the shape stays lognormal)."""
  if dataset_name not in LENGTH_DATASETS:
    raise WorkloadError(f"--dataset_name={dataset_name!r} is not one of "
                        f"{', '.join(LENGTH_DATASETS)}")
  if num < 1:
    raise WorkloadError(f"--num_prompts={num} must be at least 1")
  if dataset_name == "chat":
    if range_ratio is not None:
      raise WorkloadError(f"--random_range_ratio={range_ratio} does not apply to "
                          "--dataset_name=chat (lognormal lengths; set the means with "
                          "--random_input_len / --random_output_len)")
    scale_in = (input_len or CHAT_MEANS[0]) / CHAT_MEANS[0]
    scale_out = (output_len or CHAT_MEANS[1]) / CHAT_MEANS[1]
    _check_lengths(input_len or 1, output_len or 1, 0.0)
    (med_in, sig_in), (med_out, sig_out) = CHAT_LOGNORMAL
    limit = CHAT_MAX_TOTAL * max(scale_in, scale_out, 1.0)

    def draw(rng):
      z = rng.standard_normal((_BLOCK, 2))
      p = np.maximum(np.round(med_in * scale_in * np.exp(sig_in * z[:, 0])), SHAREGPT_MIN_LEN)
      o = np.maximum(np.round(med_out * scale_out * np.exp(sig_out * z[:, 1])),
                     SHAREGPT_MIN_LEN)
      keep = p + o < limit
      return p[keep], o[keep]
    return _blocks(seed, 1, num, draw)
  if dataset_name in SCALED_PRESETS:
    defaults = SCALED_PRESETS[dataset_name]
    n_in, n_out = input_len or defaults[0], output_len or defaults[1]
    ratio = defaults[2] if range_ratio is None else range_ratio
    _check_lengths(n_in, n_out, ratio)

    def bounds(n):
      return max(1, int(n * (1 - ratio))), max(1, int(n * (1 + ratio)))
    (in_lo, in_hi), (out_lo, out_hi) = bounds(n_in), bounds(n_out)
    return _blocks(seed, 2, num, lambda rng: (rng.integers(in_lo, in_hi + 1, _BLOCK),
                                              rng.integers(out_lo, out_hi + 1, _BLOCK)))
  # The demo-scale presets and `random`: exactly build()'s draws (prompts are short).
  requests = build(dataset_name, num_prompts=num, vocab_size=2, tokenizer=None, seed=seed,
                   input_len=input_len, output_len=output_len, range_ratio=range_ratio)
  return (np.array([len(r.prompt_token_ids) for r in requests], np.int64),
          np.array([r.output_len for r in requests], np.int64))


def build(dataset_name: str, *, num_prompts: int, vocab_size: int, tokenizer, seed: int,
          dataset_path: str | None = None, input_len: int | None = None,
          output_len: int | None = None, range_ratio: float | None = None,
          first_id: int = 0, prefix: dict | None = None) -> list[BenchRequest]:
  """The requests of a workload. Presets take their lengths from PRESETS, SCALED_PRESETS or the
  chat distribution unless given; shared-prefix workloads from PREFIX_DEFAULTS, overridden by
  `prefix` (keys PREFIX_FIELDS; None: the default)."""
  if dataset_name not in DATASETS or dataset_name in TIMED_DATASETS:
    raise WorkloadError(f"--dataset_name={dataset_name!r} is not one of "
                        f"{', '.join(d for d in DATASETS if d not in TIMED_DATASETS)} "
                        "(shifting and trace come with their arrival times: bench.timed)")
  if num_prompts < 1:
    raise WorkloadError(f"--num_prompts={num_prompts} must be at least 1")
  if dataset_name == "sharegpt":
    return sharegpt_requests(dataset_path, num_prompts, tokenizer, seed)
  if dataset_name in PREFIX_DEFAULTS:
    turns, prefix_len, num_prefixes, turn_len, default_out, think = {
        **dict(zip(PREFIX_FIELDS, PREFIX_DEFAULTS[dataset_name])),
        **{k: v for k, v in (prefix or {}).items() if v is not None}}.values()
    return multiturn_requests(num_prompts, turns=turns, prefix_len=prefix_len,
                              num_prefixes=num_prefixes, turn_len=turn_len,
                              output_len=output_len or default_out, think_time=think,
                              vocab_size=vocab_size, seed=seed, first_id=first_id)
  if dataset_name == "chat" or dataset_name in SCALED_PRESETS:
    prompt_lens, output_lens = preset_lengths(dataset_name, num_prompts, seed, input_len,
                                              output_len, range_ratio)
    import grain  # pylint: disable=g-import-not-at-top

    def make(i):
      rng = np.random.default_rng([seed, i])
      return BenchRequest([int(t) for t in rng.integers(first_id, vocab_size,
                                                        int(prompt_lens[i]))],
                          int(output_lens[i]))
    return list(grain.MapDataset.range(num_prompts).map(make))
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
