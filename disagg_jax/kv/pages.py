"""Page arithmetic, in one place: how many pages hold a number of tokens.

Pure integer functions (no JAX), shared by the engine, the schedulers (`disagg_jax.sched`), the
simulator and pool sizing (`disagg_jax.engine.memory`).
"""

from __future__ import annotations


def pages_for(num_tokens: int, page_size: int) -> int:
  """Pages that hold `num_tokens` tokens (ceil division)."""
  return -(-int(num_tokens) // int(page_size))


def page_aligned(num_tokens: int, page_size: int) -> int:
  """`num_tokens` rounded up to a whole number of pages (in tokens)."""
  return pages_for(num_tokens, page_size) * int(page_size)
