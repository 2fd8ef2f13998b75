"""Shape buckets: every jitted step sees one of a few fixed shapes, so it compiles a few times only."""

from __future__ import annotations

from typing import Sequence


def length_buckets(max_len: int, page_size: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` (at least one page) up to max_len rounded up to whole pages."""
  top = -(-max_len // page_size) * page_size
  out, n = [], max(smallest, page_size)
  n = -(-n // page_size) * page_size
  while n < top:
    out.append(n)
    n *= 2
  out.append(top)
  return tuple(out)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
  out, n = [], 1
  while n < max_batch:
    out.append(n)
    n *= 2
  out.append(max_batch)
  return tuple(out)


def pick(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
