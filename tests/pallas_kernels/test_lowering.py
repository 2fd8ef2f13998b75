"""Both kernel families lower for their hardware from this CPU-only machine.

`jax.export` runs Pallas's own lowering: Mosaic TPU (for an abstract TPU v5e / v6e device) and
Triton (for CUDA). What it cannot run is the hardware compiler behind them (libtpu, ptxas), so
this catches unsupported ops, shapes and block specs, not every backend limit.

"decode" on TPU is the ragged kernel (the default), "decode_grid" the earlier grid kernel; the
ragged kernel is also lowered per shard under `shard_map` on 4-device meshes, as the engine runs
it (rows over dp, KV heads over tp).
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, NamedSharding, PartitionSpec as P
from jax.sharding import use_abstract_mesh

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
      "decode_grid": (functools.partial(kernels.paged_decode_attention, tpu_kernel="grid"),
                      [S((64, HQ, D), BF16), S((HKV, pages, ps, D), BF16),
                       S((HKV, pages, ps, D), BF16), S((64,), jnp.int32),
                       S((64, max_pages), jnp.int32)]),
      "chunked": (kernels.chunked_prefill_attention,
                  [S((8, 256, HQ, D), BF16), S((HKV, pages, ps, D), BF16),
                   S((HKV, pages, ps, D), BF16), S((8,), jnp.int32), S((8,), jnp.int32),
                   S((8, max_pages), jnp.int32)]),
  }


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("name", ["prefill", "decode", "decode_grid", "chunked"])
def test_lowers_for_tpu(name, device_kind):
  fn, args = _cases()[name]
  mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind, 1, "tpu"))
  with use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(functools.partial(fn, backend="tpu")),
                                 platforms=["tpu"])(*args)
  assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("device_kind,dp,tp", [("TPU v5 lite", 4, 1), ("TPU v5 lite", 2, 2),
                                                ("TPU v5 lite", 1, 4), ("TPU v6 lite", 2, 2)])
def test_ragged_decode_lowers_per_shard_for_tpu(device_kind, dp, tp):
  """Llama-3-8B's heads, batch 64 at up to 8k context (512 pages of 16 per row), per shard."""
  mesh = AbstractMesh((dp, tp), ("dp", "tp"), abstract_device=AbstractDevice(device_kind, 1, "tpu"))
  b, pages, ps, max_pages = 64, 8192, 16, 512
  spec = lambda shape, dtype, *axes: jax.ShapeDtypeStruct(shape, dtype,
                                                          sharding=NamedSharding(mesh, P(*axes)))
  args = [spec((b, HQ, D), BF16, "dp", "tp"), spec((HKV, pages, ps, D), BF16, "tp"),
          spec((HKV, pages, ps, D), BF16, "tp"), spec((b,), jnp.int32, "dp"),
          spec((b, max_pages), jnp.int32, "dp")]
  fn = jax.shard_map(kernels.ragged_paged_attention, mesh=mesh,
                     in_specs=(P("dp", "tp"), P("tp"), P("tp"), P("dp"), P("dp")),
                     out_specs=P("dp", "tp"), check_vma=False)
  with use_abstract_mesh(mesh):
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  assert exported.nr_devices == dp * tp
  assert "tpu_custom_call" in exported.mlir_module()


@pytest.mark.parametrize("name", ["prefill", "decode", "chunked"])
def test_lowers_for_gpu_with_triton(name):
  fn, args = _cases()[name]
  exported = jax.export.export(
      jax.jit(functools.partial(fn, backend="gpu")), platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
