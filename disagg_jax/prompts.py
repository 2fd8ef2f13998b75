"""The offline prompt file format (docs/FORMATS.md): JSONL in, JSONL out, one line per prompt, in
order.

Input line: {"prompt_token_ids": [...]} or {"prompt": "text"}, optionally "max_new_tokens" and
"seed". A line that cannot be used becomes a `PromptLine` carrying its error; it is reported on its
own output line and never stops the other lines.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable

from disagg_jax.engine.sampling import InvalidRequestError, SamplingParams
from disagg_jax.models.tokenizer import Tokenizer, unicode_problem


@dataclasses.dataclass
class PromptLine:
  line_number: int
  prompt_token_ids: list[int] | None = None
  sampling: SamplingParams | None = None
  error: str | None = None


def parse_line(text: str, line_number: int, tokenizer: Tokenizer,
               default: SamplingParams) -> PromptLine:
  where = f"line {line_number}"
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    return PromptLine(line_number, error=f"{where}: not valid JSON ({e})")
  if not isinstance(record, dict):
    return PromptLine(line_number, error=f"{where}: expected a JSON object, got "
                                         f"{type(record).__name__}")
  has_ids, has_text = "prompt_token_ids" in record, "prompt" in record
  if has_ids == has_text:
    return PromptLine(line_number,
                      error=f"{where}: give exactly one of 'prompt_token_ids' or 'prompt'")
  if has_ids:
    ids = record["prompt_token_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
      return PromptLine(line_number, error=f"{where}: 'prompt_token_ids' must be a list of "
                                           "integers")
  else:
    if not isinstance(record["prompt"], str):
      return PromptLine(line_number, error=f"{where}: 'prompt' must be a string")
    bad = unicode_problem(record["prompt"])
    if bad:
      return PromptLine(line_number, error=f"{where}: 'prompt' {bad}")
    ids = tokenizer.encode(record["prompt"])
  changes = {k: record[k] for k in ("max_new_tokens", "seed") if k in record}
  try:
    sampling = default.replace(**changes)
  except InvalidRequestError as e:
    return PromptLine(line_number, ids, error=f"{where}: {e}")
  return PromptLine(line_number, ids, sampling)


def read_prompts(path: str, tokenizer: Tokenizer, default: SamplingParams) -> list[PromptLine]:
  """Every non-blank line of `path`, parsed; blank lines are skipped. Lines end at "\\n" (and
  "\\r\\n") only: JSON text may hold U+2028, U+2029 or U+0085 unescaped."""
  try:
    with open(path, encoding="utf-8", newline="") as f:
      lines = [line.removesuffix("\r") for line in f.read().split("\n")]
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text: {e}") from None
  return [parse_line(text, i + 1, tokenizer, default)
          for i, text in enumerate(lines) if text.strip()]


def write_outputs(path: str, records: Iterable[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
