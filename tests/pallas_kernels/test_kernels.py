"""Pallas kernels (TPU and GPU variants, in interpret mode) against the references.

Cases cover length 1, lengths at page boundaries and one either side, lengths that are not
multiples of the block sizes, empty rows, GQA ratios 1/4/8, head dims 64/128, page sizes 16/32/64
and shuffled (non-contiguous) page tables. Tolerance: max error relative to the output's scale,
1e-5 in float32 and 2e-2 in bfloat16.

Paged decode on TPU is the ragged kernel (`tpu_ragged`), checked on every decode case and on a
ragged batch; the earlier grid kernel (`tpu_kernel="grid"`) keeps one default case (splits and
multi-page blocks), the rest run under -m slow (the default suite's time budget).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import kernels, reference, tuning

BACKENDS = ("tpu", "gpu")
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def check(out, ref, dtype):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert not np.isnan(out).any()
  scale = max(np.abs(ref).max(), 1e-6)
  err = np.abs(out - ref).max() / scale
  assert err <= TOLERANCE[dtype], f"relative error {err:.2e}"


def randn(rng, shape, dtype):
  return jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)


def upcast(*xs):
  return [x.astype(jnp.float32) for x in xs]


PREFILL_CASES = [
    # (batch, seq, Hq, Hkv, D, lengths, blocks)
    (3, 37, 4, 4, 64, (37, 1, 0), None),
    (2, 100, 8, 2, 128, (100, 63), tuning.PrefillBlocks(16, 32)),
    (2, 48, 8, 1, 64, (17, 48), tuning.PrefillBlocks(8, 16)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_attention(case, dtype, backend):
  b, s, hq, hkv, d, lengths, blocks = case
  rng = np.random.default_rng(s)
  q, k, v = randn(rng, (b, s, hq, d), dtype), randn(rng, (b, s, hkv, d), dtype), randn(
      rng, (b, s, hkv, d), dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  out = kernels.prefill_attention(q, k, v, lengths, interpret=True, backend=backend,
                                  blocks=blocks)
  check(out, reference.prefill_attention(*upcast(q, k, v), lengths), dtype)


def paged_inputs(rng, b, hkv, d, page_size, max_pages, dtype):
  num_pages = b * max_pages + 5
  k_pages = randn(rng, (hkv, num_pages, page_size, d), dtype)
  v_pages = randn(rng, (hkv, num_pages, page_size, d), dtype)
  table = rng.permutation(num_pages)[:b * max_pages].reshape(b, max_pages)
  return k_pages, v_pages, jnp.asarray(table, jnp.int32)


DECODE_CASES = [
    # (Hq, Hkv, D, page_size, max_pages, lengths, blocks)
    (4, 4, 64, 16, 3, (1, 15, 16, 17, 48, 0), None),
    (8, 2, 128, 32, 4, (31, 32, 33, 128, 0), tuning.PagedBlocks(2, 2)),
    (8, 1, 128, 64, 3, (63, 64, 65, 1, 192), tuning.PagedBlocks(1, 3)),
    (4, 1, 64, 16, 9, (143, 144, 100, 0), tuning.PagedBlocks(4, 2)),
]


def _decode_params():
  """(case, dtype, kernel) for every case and dtype: "tpu" (the ragged kernel; a case's
  pages_per_block is its pages per step), "gpu", and "tpu_grid" (one default case, others slow)."""
  params = []
  grid_default = {(1, "float32")}
  for kernel in ("tpu", "gpu", "tpu_grid"):
    for dtype in (jnp.float32, jnp.bfloat16):
      for i, case in enumerate(DECODE_CASES):
        name = jnp.dtype(dtype).name
        marks = ([pytest.mark.slow] if kernel == "tpu_grid" and (i, name) not in grid_default
                 else [])
        params.append(pytest.param(case, dtype, kernel, marks=marks,
                                   id=f"case{i}-{name}-{kernel}"))
  return params


@pytest.mark.parametrize("case,dtype,kernel", _decode_params())
def test_paged_decode_attention(case, dtype, kernel):
  hq, hkv, d, page_size, max_pages, lengths, blocks = case
  rng = np.random.default_rng(page_size + max_pages)
  b = len(lengths)
  k_pages, v_pages, table = paged_inputs(rng, b, hkv, d, page_size, max_pages, dtype)
  q = randn(rng, (b, hq, d), dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  backend, tpu_kernel = {"tpu": ("tpu", "ragged"), "gpu": ("gpu", "ragged"),
                         "tpu_grid": ("tpu", "grid")}[kernel]
  out = kernels.paged_decode_attention(q, k_pages, v_pages, lengths, table, interpret=True,
                                       backend=backend, blocks=blocks, tpu_kernel=tpu_kernel)
  check(out, reference.paged_decode_attention(*upcast(q, k_pages, v_pages), lengths, table),
        dtype)


# Ragged batches for the ragged TPU kernel: (Hq, Hkv, D, page_size, lengths, pages_per_step).
RAGGED_CASES = [
    # Lengths 1 to a few hundred and one long sequence, an empty row mid-batch, several work
    # items per sequence (4 pages a step).
    pytest.param((8, 2, 128, 16, (1, 2, 15, 16, 17, 100, 0, 255, 300, 1000), 4), id="to1k"),
    # Llama-3-8B's heads and the default pages per step (16 pages: 1 MiB of K and V), lengths
    # 1 ... 8k in one batch.
    pytest.param((32, 8, 128, 16, (1, 7, 16, 300, 2049, 8192, 0, 5000), None), id="to8k",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("case", RAGGED_CASES)
def test_ragged_paged_attention(case):
  hq, hkv, d, page_size, lengths, pages_per_step = case
  dtype = jnp.float32 if pages_per_step else jnp.bfloat16
  rng = np.random.default_rng(len(lengths))
  b = len(lengths)
  max_pages = -(-max(lengths) // page_size)
  k_pages, v_pages, table = paged_inputs(rng, b, hkv, d, page_size, max_pages, dtype)
  q = randn(rng, (b, hq, d), dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  out = kernels.ragged_paged_attention(q, k_pages, v_pages, lengths, table, interpret=True,
                                       pages_per_step=pages_per_step)
  check(out, reference.paged_decode_attention(*upcast(q, k_pages, v_pages), lengths, table),
        dtype)
  assert not np.asarray(out[lengths == 0], np.float32).any()  # an empty row is zeros


CHUNK_CASES = [
    # (Hq, Hkv, D, page_size, max_pages, chunk, context_lens, chunk_lens)
    (4, 4, 64, 16, 4, 20, (0, 15, 16, 40), (20, 1, 17, 0)),
    (8, 2, 128, 32, 3, 33, (31, 0, 63), (33, 32, 1)),
    (8, 1, 64, 64, 2, 16, (64, 47, 100), (16, 9, 12)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CHUNK_CASES)
def test_chunked_prefill_attention(case, dtype, backend):
  hq, hkv, d, page_size, max_pages, c, context, chunk = case
  rng = np.random.default_rng(c)
  b = len(context)
  k_pages, v_pages, table = paged_inputs(rng, b, hkv, d, page_size, max_pages, dtype)
  q = randn(rng, (b, c, hq, d), dtype)
  context, chunk = jnp.asarray(context, jnp.int32), jnp.asarray(chunk, jnp.int32)
  out = kernels.chunked_prefill_attention(q, k_pages, v_pages, context, chunk, table,
                                          interpret=True, backend=backend,
                                          blocks=tuning.PagedBlocks(2, 1))
  check(out, reference.chunked_prefill_attention(*upcast(q, k_pages, v_pages), context, chunk,
                                                 table), dtype)


def _has_gpu():
  import jax
  return jax.default_backend() in ("gpu", "cuda")


# Compiled on a GPU: shapes with ragged lengths and the block configurations the tuner tries.
GPU_PREFILL_CASES = [
    # (batch, seq, Hq, Hkv, D, lengths, blocks)
    (3, 300, 32, 8, 128, (300, 1, 0), None),
    (2, 1000, 8, 1, 64, (1000, 517), None),
    (2, 512, 32, 8, 128, (512, 129), tuning.PrefillBlocks(128, 64, 8, 3)),
    (2, 512, 16, 16, 128, (511, 64), tuning.PrefillBlocks(64, 32, 4, 2)),
    (2, 512, 32, 8, 128, (512, 200), tuning.PrefillBlocks(128, 128, 8, 3)),
]
GPU_DECODE_CASES = [
    # (Hq, Hkv, D, page_size, max_pages, lengths, blocks)
    (32, 8, 128, 16, 64, (1, 15, 16, 17, 1000, 0), None),
    (8, 1, 64, 32, 40, (31, 32, 33, 1280, 0), tuning.PagedBlocks(8, 1, num_warps=4,
                                                                 num_stages=3)),
    (32, 8, 128, 16, 256, (4096, 4000, 17), tuning.PagedBlocks(16, 4, num_warps=8,
                                                                num_stages=2)),
    (16, 4, 128, 64, 20, (1280, 63, 65), tuning.PagedBlocks(4, 2, num_warps=4, num_stages=4)),
]
GPU_CHUNK_CASES = [
    # (Hq, Hkv, D, page_size, max_pages, chunk, context_lens, chunk_lens)
    (32, 8, 128, 16, 32, 64, (0, 100, 256, 448), (64, 1, 17, 0)),
    (8, 1, 64, 32, 12, 200, (31, 0, 100), (200, 128, 5)),
]


def _highest(fn):
  """The reference in full float32 (XLA's GPU default for float32 dots is TF32)."""
  def run(*args):
    import jax
    with jax.default_matmul_precision("highest"):
      return fn(*args)
  return run


def _with_dtypes(cases):
  """Every case in bfloat16, the first two in float32 too (full-precision dots on the GPU)."""
  return ([pytest.param(c, jnp.bfloat16, id=f"bf16-{i}") for i, c in enumerate(cases)]
          + [pytest.param(c, jnp.float32, id=f"f32-{i}") for i, c in enumerate(cases[:2])])


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case,dtype", _with_dtypes(GPU_DECODE_CASES))
def test_compiled_gpu_decode(case, dtype):
  hq, hkv, d, page_size, max_pages, lengths, blocks = case
  rng = np.random.default_rng(0)
  b = len(lengths)
  k_pages, v_pages, table = paged_inputs(rng, b, hkv, d, page_size, max_pages, dtype)
  q = randn(rng, (b, hq, d), dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  out = kernels.paged_decode_attention(q, k_pages, v_pages, lengths, table, blocks=blocks)
  ref = _highest(reference.paged_decode_attention)(*upcast(q, k_pages, v_pages), lengths, table)
  check(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case,dtype", _with_dtypes(GPU_PREFILL_CASES))
def test_compiled_gpu_prefill(case, dtype):
  b, s, hq, hkv, d, lengths, blocks = case
  rng = np.random.default_rng(0)
  q, k, v = (randn(rng, (b, s, h, d), dtype) for h in (hq, hkv, hkv))
  lengths = jnp.asarray(lengths, jnp.int32)
  out = kernels.prefill_attention(q, k, v, lengths, blocks=blocks)
  check(out, _highest(reference.prefill_attention)(*upcast(q, k, v), lengths), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case,dtype", _with_dtypes(GPU_CHUNK_CASES))
def test_compiled_gpu_chunked_prefill(case, dtype):
  hq, hkv, d, page_size, max_pages, c, context, chunk = case
  rng = np.random.default_rng(1)
  b = len(context)
  k_pages, v_pages, table = paged_inputs(rng, b, hkv, d, page_size, max_pages, dtype)
  q = randn(rng, (b, c, hq, d), dtype)
  context, chunk = jnp.asarray(context, jnp.int32), jnp.asarray(chunk, jnp.int32)
  out = kernels.chunked_prefill_attention(q, k_pages, v_pages, context, chunk, table)
  ref = _highest(reference.chunked_prefill_attention)(*upcast(q, k_pages, v_pages), context,
                                                      chunk, table)
  check(out, ref, dtype)


def test_gpu_stages_fit_shared_memory():
  from pallas_kernels import gpu_kernels
  tile = lambda rows, d, itemsize: rows * d * itemsize
  # Seen on an H200: 128x128 bf16 prefill tiles launched with 3 stages and failed with 4.
  assert gpu_kernels.fit_stages(3, 2 * tile(128, 128, 2), tile(128, 128, 2)) == 3
  assert gpu_kernels.fit_stages(4, 2 * tile(128, 128, 2), tile(128, 128, 2)) == 3
  # ... and float32 decode with 256-token blocks asked for 266 KB with 3 stages.
  assert gpu_kernels.fit_stages(3, 2 * tile(256, 64, 4), tile(16, 64, 4)) == 1
  # The tuned defaults keep their stages.
  assert gpu_kernels.fit_stages(2, 2 * tile(64, 128, 2), tile(128, 128, 2)) == 2
  assert gpu_kernels.fit_stages(3, 2 * tile(64, 128, 2), tile(16, 128, 2)) == 3
