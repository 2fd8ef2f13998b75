"""What the TPU paged decode kernels do at a shape, counted from their code rather than measured:
grid steps, bytes moved per step, SMEM and VMEM, and a modelled time per layer.

Both kernels are planned with the block sizes they would pick (`tuning.paged_blocks` for the grid
kernel `tpu_paged`, `tuning.ragged_pages_per_step` for the ragged one `tpu_ragged`). The model:

    time per layer = grid steps x STEP_OVERHEAD_S + K/V bytes read / HBM bandwidth

STEP_OVERHEAD_S = 0.35 us is the commonly quoted cost of one Pallas TPU grid step (pipeline
bookkeeping and DMA issue that the step's own transfer does not hide); it is an assumption, not a
measurement here. Bandwidths are the datasheet figures (`HBM_BW`). Only K and V pages count as
bytes (q, the output and the page indices are a few MB at most); the grid kernel reads a whole
block of pages in every step that touches a sequence's pages (slots past the end refetch its last
page), the ragged kernel only the valid pages.

Pure Python: the simulator (`disagg_jax.sim.analytic`) calls `ragged_plan` for its TPU decode
attention time, and `launch/bench_kernels.py --tpu_plan` prints `format_table`.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import tuning

STEP_OVERHEAD_S = 0.35e-6
HBM_BW = {"v5e": 819e9, "v6e": 1640e9}  # bytes/s, Google Cloud TPU datasheets
RAGGED_INDEX_RING = 3  # SMEM page-index slots of the ragged kernel (items i, i + 1, i + 2)
INT32 = 4


@dataclasses.dataclass(frozen=True)
class DecodeShape:
  """One layer's paged decode: `batch` sequences of `context` tokens each (or `lengths`)."""
  batch: int = 64
  context: int = 8192
  hq: int = 32
  hkv: int = 8
  head_dim: int = 128
  page_size: int = 16
  itemsize: int = 2  # bf16 K/V and q
  lengths: tuple[int, ...] | None = None  # ragged batch; None: every sequence at `context`

  @property
  def max_pages(self) -> int:
    """The page table's width: pages of the longest sequence."""
    return -(-max(self.seq_lengths()) // self.page_size) if self.batch else 0

  def seq_lengths(self) -> tuple[int, ...]:
    return tuple(self.lengths) if self.lengths is not None else (self.context,) * self.batch

  def seq_pages(self) -> list[int]:
    return [-(-n // self.page_size) for n in self.seq_lengths()]

  @property
  def page_bytes(self) -> int:
    """One page of one KV head, K or V."""
    return self.page_size * self.head_dim * self.itemsize


@dataclasses.dataclass(frozen=True)
class KernelPlan:
  kernel: str
  blocks: str  # what one grid step covers
  grid_steps: int
  bytes_per_step: int  # K and V bytes a full step moves
  hbm_bytes: int  # K and V bytes the call reads
  smem_bytes: int  # scalar prefetch plus SMEM scratch
  vmem_bytes: int  # pipeline buffers and scratch

  def time_s(self, hbm_bw: float, step_overhead_s: float = STEP_OVERHEAD_S) -> float:
    """Modelled seconds for the call (one layer): step overhead plus the reads at bandwidth."""
    return self.grid_steps * step_overhead_s + self.hbm_bytes / hbm_bw


def grid_plan(shape: DecodeShape) -> KernelPlan:
  """`tpu_paged.paged_decode_attention`: grid (B, Hkv, splits, page blocks per split), one KV
  head's `pages_per_block` pages a step, the whole page table scalar-prefetched."""
  blocks = tuning.paged_blocks(shape.page_size, shape.max_pages, shape.batch * shape.hkv, "tpu")
  ppb, splits = blocks.pages_per_block, blocks.num_splits
  steps_per_split = -(-(-(-shape.max_pages // ppb)) // splits)
  group = shape.hq // shape.hkv
  step_bytes = 2 * ppb * shape.page_bytes
  touched_blocks = sum(-(-p // ppb) for p in shape.seq_pages())
  q_block = group * shape.head_dim * shape.itemsize
  partials = group * (shape.head_dim + 2) * 4
  return KernelPlan(
      kernel="grid (tpu_paged)",
      blocks=f"{ppb} pages x 1 KV head, {splits} split{'s' if splits > 1 else ''}",
      grid_steps=shape.batch * shape.hkv * splits * steps_per_split,
      bytes_per_step=step_bytes,
      hbm_bytes=touched_blocks * shape.hkv * step_bytes,
      smem_bytes=INT32 * (shape.batch + shape.batch * shape.max_pages),
      vmem_bytes=2 * (step_bytes + q_block + partials) + partials)


def ragged_pages_per_step(shape: DecodeShape) -> int:
  return tuning.ragged_pages_per_step(shape.page_size, shape.max_pages, shape.hkv,
                                      shape.head_dim, shape.itemsize)


def ragged_vmem_bytes(batch: int, hq: int, hkv: int, head_dim: int, tokens_per_step: int,
                      itemsize: int) -> int:
  """The ragged kernel's VMEM: q and the output (whole-array blocks, double-buffered by the
  pipeline like any block), two K and two V step buffers, the float32 softmax scratch."""
  q_and_out = 2 * 2 * batch * hq * head_dim * itemsize
  kv = 2 * 2 * hkv * tokens_per_step * head_dim * itemsize
  return q_and_out + kv + hq * (head_dim + 2) * 4


def ragged_plan(shape: DecodeShape) -> KernelPlan:
  """`tpu_ragged.ragged_paged_attention`: one grid step per work item (`pages_per_step` pages of
  one sequence, every KV head), lengths and the work list's prefix sums in SMEM, page indices
  fetched per item into a small SMEM ring."""
  pps = ragged_pages_per_step(shape)
  pages = shape.seq_pages()
  items = sum(-(-p // pps) for p in pages)
  step_bytes = 2 * pps * shape.hkv * shape.page_bytes
  return KernelPlan(
      kernel="ragged (tpu_ragged)",
      blocks=f"{pps} pages x {shape.hkv} KV heads",
      grid_steps=max(items, 1),
      bytes_per_step=step_bytes,
      hbm_bytes=sum(pages) * 2 * shape.hkv * shape.page_bytes,
      smem_bytes=INT32 * (shape.batch + (shape.batch + 1) + RAGGED_INDEX_RING * pps),
      vmem_bytes=ragged_vmem_bytes(shape.batch, shape.hq, shape.hkv, shape.head_dim,
                                   pps * shape.page_size, shape.itemsize))


def plans(shape: DecodeShape) -> tuple[KernelPlan, KernelPlan]:
  """(today's grid kernel, the ragged kernel) at `shape`."""
  return grid_plan(shape), ragged_plan(shape)


def format_table(shape: DecodeShape, dtype_name: str = "bfloat16") -> str:
  """A Markdown table of both kernels' plans with the modelled time per layer on v5e and v6e."""
  grid, ragged = plans(shape)
  kib = lambda n: f"{n / 1024:,.1f}"
  lines = [
      f"TPU paged decode, one layer: B={shape.batch} context={shape.context} Hq={shape.hq} "
      f"Hkv={shape.hkv} D={shape.head_dim} page={shape.page_size} {dtype_name}",
      f"model: time = grid steps x {STEP_OVERHEAD_S * 1e6:.2f} us + K/V bytes / HBM bandwidth "
      f"(v5e {HBM_BW['v5e'] / 1e9:.0f} GB/s, v6e {HBM_BW['v6e'] / 1e9:.0f} GB/s)",
      "",
      "| kernel | a step covers | grid steps | KiB/step | K/V MiB read | SMEM KiB | VMEM KiB "
      "| v5e ms/layer | v6e ms/layer |",
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for plan in (grid, ragged):
    times = [plan.time_s(HBM_BW[k]) * 1e3 for k in ("v5e", "v6e")]
    lines.append(f"| {plan.kernel} | {plan.blocks} | {plan.grid_steps:,} | "
                 f"{kib(plan.bytes_per_step)} | {plan.hbm_bytes / 2**20:,.1f} | "
                 f"{kib(plan.smem_bytes)} | {kib(plan.vmem_bytes)} | {times[0]:.3f} | "
                 f"{times[1]:.3f} |")
  lines.append("")
  lines.append(f"ragged vs grid: {grid.grid_steps / ragged.grid_steps:.1f}x fewer steps, "
               f"{ragged.bytes_per_step / grid.bytes_per_step:.0f}x the bytes per step, "
               f"{grid.smem_bytes / ragged.smem_bytes:.0f}x less SMEM; bandwidth floor "
               + ", ".join(f"{k} {grid.hbm_bytes / HBM_BW[k] * 1e3:.3f} ms" for k in HBM_BW))
  return "\n".join(lines)
