"""Shape buckets: every jitted step sees one of a few fixed shapes, so it compiles a few times only."""

from __future__ import annotations

from disagg_jax.kv.pages import page_aligned
from disagg_jax.sched.pool import pick  # pylint: disable=unused-import  (buckets.pick)


def length_buckets(max_len: int, page_size: int, smallest: int = 16,
                   factor: int = 2) -> tuple[int, ...]:
  """Powers of `factor` from `smallest` (at least one page) up to max_len rounded up to whole
  pages."""
  top = page_aligned(max_len, page_size)
  out, n = [], page_aligned(max(smallest, page_size), page_size)
  while n < top:
    out.append(n)
    n *= factor
  out.append(top)
  return tuple(out)


def width_buckets(max_seq_len: int, page_size: int, smallest: int = 64) -> tuple[int, ...]:
  """Page-table widths (pages) of the paged steps: powers of two covering `smallest` tokens up to
  max_seq_len. A step reads (and the XLA path gathers) a page-table row's every page, so a batch
  of short sequences gets a narrow table instead of one sized for max_seq_len."""
  return tuple(n // page_size for n in length_buckets(max_seq_len, page_size, smallest))


def coarser(values: tuple[int, ...]) -> tuple[int, ...]:
  """Every other bucket, and always the largest: a set with a quarter of the shapes per power of
  four instead of per power of two."""
  return tuple(sorted(set(values[::2]) | {values[-1]}))


def batch_buckets(max_batch: int, multiple: int = 1) -> tuple[int, ...]:
  """Powers of two up to max_batch; with `multiple` (a mesh's dp), multiples of it: powers of two
  times `multiple` up to max_batch rounded up to one."""
  top = -(-max_batch // multiple)
  out, n = [], 1
  while n < top:
    out.append(n * multiple)
    n *= 2
  out.append(top * multiple)
  return tuple(out)


def chunk_rows(chunk_batch: int, dp: int = 1) -> tuple[int, ...]:
  """Chunk rows per dp row of the colocated engine's mixed steps: one, or all chunk_batch / dp."""
  return tuple(sorted({1, max(chunk_batch // dp, 1)}))


def chunk_lens(chunk_size: int) -> tuple[int, ...]:
  """Chunk lengths of the mixed steps: powers of two from 32 up to chunk_size."""
  return length_buckets(chunk_size, page_size=1, smallest=32)


def decode_rows(slots_per_shard: int) -> tuple[int, ...]:
  """Rows per dp row that a decode step computes: a quarter of the slots, or all of them (the
  slots in use are a prefix: requests take the lowest free slot)."""
  return tuple(sorted({max(slots_per_shard // 4, 1), slots_per_shard}))


def staging_tokens(setting: int, max_seq_len: int, page_size: int, prefill_batch: int,
                   max_prefill_tokens: int) -> int:
  """`--config.engine.staging_tokens` resolved: tokens of prefilled KV that may wait on the decode
  devices for a slot. -1: one full prefill step (`prefill_batch` prompts of the longest length
  bucket, capped at `max_prefill_tokens`), so prefill can run a step while the one before waits
  to be inserted; never below the longest length bucket, which one prompt may take."""
  longest = length_buckets(max_seq_len, page_size)[-1]
  if setting == -1:
    return max(longest, min(prefill_batch * longest, max_prefill_tokens))
  if setting < longest:
    raise ValueError(f"--config.engine.staging_tokens={setting} is below the longest prompt's "
                     f"length bucket ({longest} tokens at max_seq_len={max_seq_len}): set it to "
                     "at least that, or -1 (one full prefill step)")
  return setting
