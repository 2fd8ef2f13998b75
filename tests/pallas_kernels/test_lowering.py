"""Both kernel families lower for their hardware from this CPU-only machine.

`jax.export` runs Pallas's own lowering: Mosaic TPU (for an abstract TPU v5e / v6e device) and
Triton (for CUDA). What it cannot run is the hardware compiler behind them (libtpu, ptxas), so
this catches unsupported ops, shapes and block specs, not every backend limit.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from pallas_kernels import kernels

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
HQ, HKV, D = 32, 8, 128


def _cases():
  pages, ps, max_pages = 4096, 16, 256
  return {
      "prefill": (kernels.prefill_attention,
                  [S((4, 4096, HQ, D), BF16), S((4, 4096, HKV, D), BF16),
                   S((4, 4096, HKV, D), BF16), S((4,), jnp.int32)]),
      "decode": (kernels.paged_decode_attention,
                 [S((64, HQ, D), BF16), S((HKV, pages, ps, D), BF16),
                  S((HKV, pages, ps, D), BF16), S((64,), jnp.int32),
                  S((64, max_pages), jnp.int32)]),
      "chunked": (kernels.chunked_prefill_attention,
                  [S((8, 256, HQ, D), BF16), S((HKV, pages, ps, D), BF16),
                   S((HKV, pages, ps, D), BF16), S((8,), jnp.int32), S((8,), jnp.int32),
                   S((8, max_pages), jnp.int32)]),
  }


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("name", ["prefill", "decode", "chunked"])
def test_lowers_for_tpu(name, device_kind):
  fn, args = _cases()[name]
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind, 1, "tpu"))
  with use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(functools.partial(fn, backend="tpu")),
                                 platforms=["tpu"])(*args)
  assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("name", ["prefill", "decode", "chunked"])
def test_lowers_for_gpu_with_triton(name):
  fn, args = _cases()[name]
  exported = jax.export.export(
      jax.jit(functools.partial(fn, backend="gpu")), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
