"""The TPU decode kernels' plan (pallas_kernels/tpu_plan.py): the issue's three targets at
Llama-3-8B, and the plan's step count against the ragged kernel's own work list. No kernel runs."""

import jax.numpy as jnp
import pytest

from pallas_kernels import tpu_plan, tpu_ragged, tuning


def test_ragged_plan_meets_the_targets():
  llama8b = tpu_plan.DecodeShape(batch=64, context=8192, hq=32, hkv=8, head_dim=128,
                                 page_size=16, itemsize=2)
  grid, ragged = tpu_plan.plans(llama8b)
  # Today's kernel: a step per (sequence, KV head, 8 pages): 64 x 8 x 64.
  assert grid.grid_steps == 64 * 8 * 64
  assert ragged.grid_steps <= grid.grid_steps / 8
  assert ragged.bytes_per_step >= 512 * 1024
  assert ragged.hbm_bytes == grid.hbm_bytes == 64 * 8192 * 2 * 8 * 128 * 2
  big = tpu_plan.DecodeShape(batch=256, context=32768)
  assert tpu_plan.grid_plan(big).smem_bytes > 2 * 2**20  # the whole table: beyond SMEM
  assert tpu_plan.ragged_plan(big).smem_bytes <= 256 * 1024
  # The model: steps x 0.35 us + bytes / bandwidth.
  assert ragged.time_s(819e9) == pytest.approx(2048 * 0.35e-6 + ragged.hbm_bytes / 819e9)
  assert ragged.time_s(tpu_plan.HBM_BW["v6e"]) < ragged.time_s(tpu_plan.HBM_BW["v5e"])
  assert ragged.time_s(819e9) < grid.time_s(819e9) / 4
  table = tpu_plan.format_table(llama8b)
  assert "| ragged (tpu_ragged) | 16 pages x 8 KV heads | 2,048 | 1,024.0 |" in table
  assert "0.35 us" in table and "819 GB/s" in table and "1640 GB/s" in table


def test_ragged_plan_counts_the_kernels_work_items():
  lengths = (1, 2, 15, 16, 17, 100, 0, 255, 300, 1000, 8192)
  shape = tpu_plan.DecodeShape(batch=len(lengths), hq=32, hkv=8, head_dim=128, page_size=16,
                               itemsize=2, lengths=lengths)
  pps = tpu_plan.ragged_pages_per_step(shape)
  assert pps == tuning.ragged_pages_per_step(16, 512, 8, 128, 2) == 16
  cu = tpu_ragged.work_list(jnp.asarray(lengths, jnp.int32), 16, pps, shape.max_pages)
  assert int(cu[-1]) == tpu_plan.ragged_plan(shape).grid_steps == 7 * 1 + 2 + 4 + 32
  # No step for an empty sequence, and none past a sequence's end.
  assert int(cu[7] - cu[6]) == 0 and int(cu[-1] - cu[-2]) == 8192 // 256
