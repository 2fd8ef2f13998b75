"""Block sizes per backend and shape. Every kernel asks here, so tuning results live in one place.

GPU choices come from searches on an H200 (2026-11-27, `launch/bench_kernels.py --tune`, figures
in docs/BENCHMARKS.md): prefill 128-query x 64-key tiles, 4 warps, 2 stages (best of 15
configurations); decode 64-token page blocks, 4 warps, 3 stages, context splits until about 1024
programs are in flight (within 5% of the best of 72). TPU blocks follow the MXU: multiples of 128
rows where the sequence allows (not measured on a TPU here). The ragged TPU decode kernel moves
about `RAGGED_STEP_BYTES` per grid step (a size chosen against the modelled per-step overhead of
`tpu_plan`, not measured).
"""

from __future__ import annotations

import dataclasses

GPU_PREFILL_WARPS, GPU_PREFILL_STAGES = 4, 2
GPU_DECODE_WARPS, GPU_DECODE_STAGES = 4, 3


@dataclasses.dataclass(frozen=True)
class PrefillBlocks:
  block_q: int  # query positions per block (TPU: each carrying the Hq/Hkv heads of a KV head)
  block_k: int  # key positions per block
  num_warps: int = 4  # GPU only
  num_stages: int = 2  # GPU only: software-pipelined loads in flight


@dataclasses.dataclass(frozen=True)
class PagedBlocks:
  pages_per_block: int  # pages fetched and processed per step
  num_splits: int  # independent partitions of the context (flash-decoding), combined after
  block_q: int = 16  # chunked prefill: query positions per block
  num_warps: int = 4  # GPU only
  num_stages: int = 2  # GPU only


def _pow2_at_least(n: int, floor: int) -> int:
  out = floor
  while out < n:
    out *= 2
  return out


def _pow2_at_most(n: int, cap: int) -> int:
  out = 1
  while out * 2 <= min(n, cap):
    out *= 2
  return out


def prefill_blocks(seq_len: int, head_dim: int, group: int, backend: str) -> PrefillBlocks:
  """Query tiles carry `group` heads each, so block_q shrinks as the group grows."""
  if backend == "gpu":  # one query head per program; tensor-core dots need >= 16 rows
    rows = 128 if head_dim <= 128 else 64
    fit = lambda cap: min(cap, _pow2_at_least(seq_len, 16))
    return PrefillBlocks(fit(rows), fit(64), num_warps=GPU_PREFILL_WARPS,
                         num_stages=GPU_PREFILL_STAGES)
  block_q = max(512 // group, 8)
  return PrefillBlocks(_pow2_at_most(seq_len, block_q), _pow2_at_most(seq_len, 512))


def chunk_block_q(chunk_len: int, head_dim: int, group: int, backend: str) -> int:
  """Query positions per block for chunked prefill; GPU tensor-core dots need >= 16 rows."""
  if backend == "gpu":  # rows of a block are block_q positions x group heads
    rows = 128 if head_dim <= 128 else 64
    return max(_pow2_at_most(chunk_len, max(rows // group, 1)), -(-16 // group))
  return prefill_blocks(chunk_len, head_dim, group, backend).block_q


def paged_blocks(page_size: int, max_pages: int, batch_heads: int, backend: str) -> PagedBlocks:
  """Enough pages per step to make each fetch worthwhile (~128+ tokens), and context splits when
  batch x kv-heads alone cannot fill the machine."""
  tokens = 64 if backend == "gpu" else 128
  pages = max(1, min(max_pages, tokens // page_size if page_size < tokens else 1))
  pages = _pow2_at_most(pages, pages)
  steps = -(-max_pages // pages)
  # GPU: ~8 programs per SM (132 SMs on an H100/H200) keep enough loads in flight; TPU: two
  # cores at most.
  target_programs = 1024 if backend == "gpu" else 2
  splits = 1
  while batch_heads * splits < target_programs and splits * 2 <= steps:
    splits *= 2
  if backend == "gpu":
    return PagedBlocks(pages_per_block=pages, num_splits=splits, num_warps=GPU_DECODE_WARPS,
                       num_stages=GPU_DECODE_STAGES)
  return PagedBlocks(pages_per_block=pages, num_splits=splits)


RAGGED_STEP_BYTES = 1 << 20  # K and V of every KV head: 16 pages of 16 tokens at Llama-3-8B
RAGGED_MAX_PAGES_PER_STEP = 32  # each page is two DMAs, unrolled in the kernel


def ragged_pages_per_step(page_size: int, max_pages: int, num_kv_heads: int, head_dim: int,
                          itemsize: int) -> int:
  """Pages per work item of the ragged TPU decode kernel: about RAGGED_STEP_BYTES of K and V
  (all KV heads) per grid step, at most RAGGED_MAX_PAGES_PER_STEP and the page table's width."""
  token_bytes = 2 * num_kv_heads * head_dim * itemsize
  pages = max(1, RAGGED_STEP_BYTES // (token_bytes * page_size))
  return max(1, min(pages, RAGGED_MAX_PAGES_PER_STEP, max_pages))
