"""Ragged paged decode attention for Pallas TPU: a grid over a work list of the batch's real pages.

`tpu_paged.paged_decode_attention` runs a grid step per (sequence, KV head, block of
`pages_per_block` pages) up to the page table's width, whatever each sequence's length, and
scalar-prefetches the whole page table into SMEM. Here instead:

- **Work list.** Before the kernel (plain JAX ops inside the same jit), each sequence's pages are
  cut into work items of `pages_per_step` pages; `cu_items[b]` is the first item of sequence b.
  The grid is one dimension of exactly `cu_items[B]` steps (a dynamic grid bound), so a sequence
  costs ceil(pages / pages_per_step) steps and pages past its end cost none; an empty sequence
  costs nothing (its output is zeros).
- **Every KV head per step.** A step moves `pages_per_step` pages of all Hkv heads, K and V
  (1 MiB at the Llama-3-8B shape: 16 pages of 16 tokens x 8 heads x 128 x bf16 x 2), with manual
  DMAs from the pools left in HBM (`memory_space=pl.ANY`), double-buffered: step i starts step
  i+1's page copies before it waits for its own.
- **The page table stays in HBM.** Only `lengths` and `cu_items` (4 x (2B + 1) bytes) are
  scalar-prefetched. Each item's `pages_per_step` page indices are copied from the table into a
  3-deep SMEM ring two steps ahead (a 4 x pages_per_step-byte DMA), in time for the K/V copies of
  the step before that item's.
- **Online softmax per sequence.** A sequence's items are consecutive, so one running (max,
  denominator, accumulator) per query head lives in VMEM scratch: reset on a sequence's first
  item, written to that sequence's output row on its last. q and the output are whole-array VMEM
  blocks ([B, Hkv, G, D], a few MB at most), fetched once and written back once.

The grid's single dimension is sequential ("arbitrary"): TPU v5e and v6e have one TensorCore per
chip. Work on chips with two cores (v4, v5p) would need the list split in two.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _softmax, tpu_plan

# Page-index copies in flight: items i (in use), i + 1 (its K/V copying), i + 2.
IDX_RING = tpu_plan.RAGGED_INDEX_RING


def work_list(lengths, page_size: int, pages_per_step: int, max_pages: int):
  """lengths int32[B] -> cu_items int32[B + 1]: sequence b owns work items
  [cu_items[b], cu_items[b + 1]), item j of it covering its pages [j, j + 1) x pages_per_step."""
  pages = jnp.clip(pl.cdiv(lengths, page_size), 0, max_pages)
  items = pl.cdiv(pages, pages_per_step)
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(items, dtype=jnp.int32)])


def _find_sequence(cu_ref, item, batch: int):
  """The b with cu_items[b] <= item < cu_items[b + 1] (the last such b, so sequences without
  items, whose cu_items equal the next one's, are passed over): a branch-free binary search over
  the B + 1 prefix sums in SMEM, ceil(log2 B) scalar steps."""
  seq = jnp.int32(0)
  step = 1 << max(batch - 1, 0).bit_length()
  while step:
    cand = seq + step
    ok = (cand < batch) & (cu_ref[jnp.minimum(cand, batch - 1)] <= item)
    seq = jnp.where(ok, cand, seq)
    step //= 2
  return seq


def _kernel(lengths_ref, cu_ref, q_ref, k_hbm, v_hbm, table_hbm, o_ref, idx_ref, k_buf, v_buf,
            m_ref, l_ref, acc_ref, idx_sems, kv_sems, *, scale, batch, page_size,
            pages_per_step, max_pages):
  i = pl.program_id(0)
  total = cu_ref[batch]
  hkv = k_buf.shape[1]

  def item_info(item):
    seq = _find_sequence(cu_ref, item, batch)
    first_page = (item - cu_ref[seq]) * pages_per_step
    pages = jnp.minimum(pl.cdiv(lengths_ref[seq], page_size), max_pages)  # as work_list
    return seq, first_page, jnp.minimum(pages - first_page, pages_per_step)

  def idx_copy(item):
    seq, first_page, _ = item_info(item)
    return pltpu.make_async_copy(table_hbm.at[seq, pl.ds(first_page, pages_per_step)],
                                 idx_ref.at[item % IDX_RING], idx_sems.at[item % IDX_RING])

  def kv_copies(item, fn):
    """Starts (or waits for) the K and V copies of the item's valid pages, all heads each."""
    _, _, valid = item_info(item)
    slot, ring = item % 2, item % IDX_RING
    for j in range(pages_per_step):
      @pl.when(j < valid)
      def _():
        page = idx_ref[ring, j]
        rows = pl.ds(j * page_size, page_size)
        for hbm, buf, kind in ((k_hbm, k_buf, 0), (v_hbm, v_buf, 1)):
          fn(pltpu.make_async_copy(hbm.at[:, page], buf.at[slot, :, rows],
                                   kv_sems.at[slot, kind]))

  @pl.when(i == 0)
  def _prologue():
    o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)  # rows of empty sequences stay zero
    # Slots never copied into are masked out, but must not hold NaN (0 x NaN in p @ V).
    k_buf[...] = jnp.zeros(k_buf.shape, k_buf.dtype)
    v_buf[...] = jnp.zeros(v_buf.shape, v_buf.dtype)

    @pl.when(total > 0)
    def _():
      first = idx_copy(0)
      first.start()
      first.wait()
      kv_copies(0, lambda c: c.start())

    @pl.when(total > 1)
    def _():
      idx_copy(1).start()

  @pl.when(i + 1 < total)
  def _prefetch_next():
    idx_copy(i + 1).wait()
    kv_copies(i + 1, lambda c: c.start())

  @pl.when(i + 2 < total)
  def _prefetch_indices():
    idx_copy(i + 2).start()

  @pl.when(i < total)
  def _compute():
    seq, first_page, _ = item_info(i)
    kv_copies(i, lambda c: c.wait())
    slot = i % 2
    length = lengths_ref[seq]

    @pl.when(first_page == 0)
    def _init():
      _softmax.init_scratch(m_ref, l_ref, acc_ref)

    group = q_ref.shape[2]
    tokens = pages_per_step * page_size
    k_pos = first_page * page_size + jax.lax.broadcasted_iota(jnp.int32, (group, tokens), 1)
    visible = k_pos < length
    for h in range(hkv):
      scores = _softmax.dot_nt(q_ref[seq, h], k_buf[slot, h]) * scale  # [G, tokens]
      m, l, acc = _softmax.update(scores, visible, v_buf[slot, h], m_ref[h], l_ref[h],
                                  acc_ref[h])
      m_ref[h], l_ref[h], acc_ref[h] = m, l, acc

    @pl.when(i + 1 == cu_ref[seq + 1])
    def _store():
      o_ref[seq] = _softmax.finish(l_ref[...], acc_ref[...]).astype(o_ref.dtype)


def _vmem_limit(need: int) -> int | None:
  """Mosaic's default scoped VMEM (16 MiB on v5e) unless the blocks need more: then room for them
  (a large batch's q and output), within the 128 MiB of a v5e / v6e core."""
  if need <= 12 * 2**20:
    return None
  return min(need + need // 4 + 4 * 2**20, 100 * 2**20)


def ragged_paged_attention(q, k_pages, v_pages, lengths, page_table, *, sm_scale=None,
                           pages_per_step, interpret=False):
  """q: [B, Hq, D]; k/v pages: [Hkv, P, page_size, D]; lengths int32[B];
  page_table int32[B, max_pages] -> [B, Hq, D] (zeros for a zero length)."""
  b, hq, d = q.shape
  hkv, _, page_size, _ = k_pages.shape
  group = hq // hkv
  max_pages = page_table.shape[1]
  pages_per_step = max(1, min(pages_per_step, max_pages))
  scale = d ** -0.5 if sm_scale is None else sm_scale
  lengths = lengths.astype(jnp.int32)
  cu_items = work_list(lengths, page_size, pages_per_step, max_pages)
  # A last item reads a whole pages_per_step window of its row: pad the row to a multiple.
  table = _softmax.pad_axis(page_table.astype(jnp.int32), 1, pages_per_step)
  tokens = pages_per_step * page_size
  vmem = tpu_plan.ragged_vmem_bytes(b, hq, hkv, d, tokens, q.dtype.itemsize)
  kernel = functools.partial(_kernel, scale=scale, batch=b, page_size=page_size,
                             pages_per_step=pages_per_step, max_pages=max_pages)
  whole = pl.BlockSpec((b, hkv, group, d), lambda i, *_: (0, 0, 0, 0))
  hbm = pl.BlockSpec(memory_space=pl.ANY)
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          # One step per work item; at least one, which writes the zeros of an all-empty batch.
          grid=(jnp.maximum(cu_items[b], 1),),
          in_specs=[whole, hbm, hbm, hbm],
          out_specs=whole,
          scratch_shapes=[pltpu.SMEM((IDX_RING, pages_per_step), jnp.int32),
                          pltpu.VMEM((2, hkv, tokens, d), k_pages.dtype),
                          pltpu.VMEM((2, hkv, tokens, d), v_pages.dtype),
                          pltpu.VMEM((hkv, group, 1), jnp.float32),
                          pltpu.VMEM((hkv, group, 1), jnp.float32),
                          pltpu.VMEM((hkv, group, d), jnp.float32),
                          pltpu.SemaphoreType.DMA((IDX_RING,)),
                          pltpu.SemaphoreType.DMA((2, 2))]),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",),
                                           vmem_limit_bytes=_vmem_limit(vmem)),
      out_shape=jax.ShapeDtypeStruct((b, hkv, group, d), q.dtype),
      interpret=pltpu.InterpretParams() if interpret else False,
  )(lengths, cu_items, q.reshape(b, hkv, group, d), k_pages, v_pages, table)
  return out.reshape(b, hq, d)
