"""The public Pallas kernels (signatures fixed by DESIGN.md), choosing the backend and block sizes.

`backend` is "tpu" (Mosaic TPU) or "gpu" (Triton); by default "gpu" on NVIDIA GPUs and "tpu"
everywhere else. `interpret=True` runs the kernel on CPU: TPU kernels in TPU interpret mode, GPU
kernels in Pallas's generic interpreter.

Paged decode on TPU is the ragged kernel (`tpu_ragged`: a grid over the batch's real pages, all KV
heads per step, the page table read from HBM); `tpu_kernel="grid"` selects the earlier one
(`tpu_paged`: a grid step per sequence, KV head and page block, the table in SMEM).
"""

from __future__ import annotations

import jax

from pallas_kernels import gpu_kernels, tpu_paged, tpu_prefill, tpu_ragged, tuning

TPU_DECODE_KERNELS = ("ragged", "grid")


def default_backend() -> str:
  return "gpu" if jax.default_backend() in ("gpu", "cuda") else "tpu"


def prefill_attention(q, k, v, lengths, *, causal=True, sm_scale=None, interpret=False,
                      backend=None, blocks: tuning.PrefillBlocks | None = None):
  """q: [B, S, Hq, D]; k, v: [B, S, Hkv, D]; lengths int32[B] (right padding) -> [B, S, Hq, D]."""
  backend = backend or default_backend()
  _, s, hq, d = q.shape
  blocks = blocks or tuning.prefill_blocks(s, d, hq // k.shape[2], backend)
  if backend == "gpu":
    return gpu_kernels.prefill_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale,
                                         block_q=blocks.block_q, block_k=blocks.block_k,
                                         num_warps=blocks.num_warps,
                                         num_stages=blocks.num_stages, interpret=interpret)
  return tpu_prefill.prefill_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale,
                                       block_q=blocks.block_q, block_k=blocks.block_k,
                                       interpret=interpret)


def ragged_paged_attention(q, k_pages, v_pages, lengths, page_table, *, sm_scale=None,
                           interpret=False, pages_per_step: int | None = None):
  """Paged decode on TPU over a work list of the batch's real pages (`tpu_ragged`).

  q: [B, Hq, D]; k/v pages: [Hkv, num_pages, page_size, D]; lengths int32[B] (0: an idle row,
  whose output is zeros); page_table int32[B, max_pages_per_seq] -> [B, Hq, D]. A grid step
  covers `pages_per_step` pages of one sequence, all KV heads (default
  `tuning.ragged_pages_per_step`: about 1 MiB of K and V a step); a sequence of n pages costs
  ceil(n / pages_per_step) steps. TPU (Mosaic) only.
  """
  hkv, _, page_size, d = k_pages.shape
  if pages_per_step is None:
    pages_per_step = tuning.ragged_pages_per_step(page_size, page_table.shape[1], hkv, d,
                                                  k_pages.dtype.itemsize)
  return tpu_ragged.ragged_paged_attention(q, k_pages, v_pages, lengths, page_table,
                                           sm_scale=sm_scale, pages_per_step=pages_per_step,
                                           interpret=interpret)


def paged_decode_attention(q, k_pages, v_pages, lengths, page_table, *, sm_scale=None,
                           interpret=False, backend=None,
                           blocks: tuning.PagedBlocks | None = None, tpu_kernel: str = "ragged"):
  """q: [B, Hq, D]; k/v pages: [Hkv, num_pages, page_size, D]; lengths int32[B];
  page_table int32[B, max_pages_per_seq] -> [B, Hq, D].

  On TPU, `tpu_kernel` "ragged" (default; `blocks.pages_per_block`, if given, is its pages per
  step) or "grid" (the earlier per-head grid, `blocks` its block sizes)."""
  backend = backend or default_backend()
  hkv, _, page_size, _ = k_pages.shape
  if backend != "gpu":
    if tpu_kernel not in TPU_DECODE_KERNELS:
      raise ValueError(f"tpu_kernel={tpu_kernel!r} is not one of {', '.join(TPU_DECODE_KERNELS)}")
    if tpu_kernel == "ragged":
      return ragged_paged_attention(q, k_pages, v_pages, lengths, page_table, sm_scale=sm_scale,
                                    interpret=interpret,
                                    pages_per_step=blocks.pages_per_block if blocks else None)
  blocks = blocks or tuning.paged_blocks(page_size, page_table.shape[1], q.shape[0] * hkv,
                                         backend)
  if backend == "gpu":
    return gpu_kernels.paged_decode_attention(
        q, k_pages, v_pages, lengths, page_table, sm_scale=sm_scale,
        pages_per_block=blocks.pages_per_block, num_splits=blocks.num_splits,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret)
  return tpu_paged.paged_decode_attention(q, k_pages, v_pages, lengths, page_table,
                                          sm_scale=sm_scale,
                                          pages_per_block=blocks.pages_per_block,
                                          num_splits=blocks.num_splits, interpret=interpret)


def chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens, page_table, *,
                              sm_scale=None, interpret=False, backend=None,
                              blocks: tuning.PagedBlocks | None = None):
  """A chunk of queries against a sequence's cached pages plus itself, causally.

  q: [B, C, Hq, D], query i of row b at position context_lens[b] + i; k/v pages
  [Hkv, num_pages, page_size, D] already holding the chunk's keys/values; context_lens,
  chunk_lens int32[B] (chunk_lens <= C; queries past it give zeros); page_table int32[B, max_pages]
  -> [B, C, Hq, D]. Decode is C = 1; prefix caching is a chunk whose context is the shared prefix.
  """
  backend = backend or default_backend()
  hkv, _, page_size, _ = k_pages.shape
  group = q.shape[2] // hkv
  blocks = blocks or tuning.paged_blocks(page_size, page_table.shape[1], q.shape[0] * hkv,
                                         backend)
  block_q = tuning.chunk_block_q(q.shape[1], q.shape[3], group, backend)
  if backend == "gpu":
    return gpu_kernels.chunked_prefill_attention(
        q, k_pages, v_pages, context_lens, chunk_lens, page_table, sm_scale=sm_scale,
        block_q=block_q, pages_per_block=blocks.pages_per_block, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages, interpret=interpret)
  return tpu_paged.chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens,
                                             page_table, sm_scale=sm_scale, block_q=block_q,
                                             pages_per_block=blocks.pages_per_block,
                                             interpret=interpret)
