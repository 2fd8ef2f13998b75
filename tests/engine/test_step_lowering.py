"""Every jitted step of both engines lowers for TPU (Mosaic) and for GPU (Triton) on every mesh
shape the engines build, from this CPU-only machine, with the real Pallas kernels.

`jax.export` runs Pallas's own lowering; the meshes are abstract meshes of TPU / GPU devices
(Mosaic reads the TPU generation from them). On a multi-device mesh a Pallas kernel must run
inside `shard_map` (XLA cannot partition it): Mosaic refuses otherwise, and for Triton the test
checks that every kernel call sits inside a manual (shard_map) computation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import (AbstractDevice, AbstractMesh, NamedSharding, PartitionSpec as P,
                          use_abstract_mesh)

from disagg_jax import parallel
from disagg_jax.engine.sampling import SamplingArrays
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.kv import cache as kv_cache
from disagg_jax.models import loading
from disagg_jax.models.config import ModelConfig
from disagg_jax.transfer.plan import TransferPlan
from pallas_kernels import dispatch

# TPU-friendly shapes (head_dim 128, page_size 16) at a tiny width and depth.
CFG = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                  num_layers=2, num_heads=8, num_kv_heads=4, head_dim=128,
                  max_position_embeddings=1024)
CFG_2KV = dataclasses.replace(CFG, num_kv_heads=2)
PAGE_SIZE, PAGES, WIDTH, BATCH = 16, 64, 8, 8
PREFILL = (4, 128)  # batch, length
CHUNKS = (4, 64)  # chunk rows, chunk length

PLATFORMS = {
    "tpu": (AbstractDevice("TPU v5 lite", 1, "tpu"), "tpu", "tpu_custom_call"),
    "cuda": (AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu"), "gpu",
             "__gpu$xla.gpu.triton"),
}
MESHES = {"1x1": (1, 1, CFG), "dp4": (4, 1, CFG), "dp2xtp2": (2, 2, CFG), "tp4": (1, 4, CFG),
          "tp4_2kv": (1, 4, CFG_2KV)}


def _kernel_calls(exported, target):
  """(inside shard_map, outside) counts of custom calls to `target` in the exported module."""
  from jax._src.interpreters import mlir as jmlir  # pylint: disable=g-import-not-at-top
  from jax._src.lib.mlir import ir  # pylint: disable=g-import-not-at-top
  with jmlir.make_ir_context():
    module = ir.Module.parse(exported.mlir_module())
  counts = [0, 0]

  def walk(op, inside):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          name = child.operation.name
          if (name == "stablehlo.custom_call"
              and ir.StringAttr(child.attributes["call_target_name"]).value == target):
            counts[0 if inside else 1] += 1
          walk(child.operation, inside or name == "sdy.manual_computation")

  walk(module.operation, False)
  return tuple(counts)


def _spec(mesh, shape, dtype, spec=P()):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _step_args(steps: ModelSteps, plan: TransferPlan):
  """{step name: (Step, abstract arguments)} for every jitted step."""
  mesh, cfg = steps.mesh, steps.cfg
  rows = lambda shape, dtype=jnp.int32: _spec(mesh, shape, dtype, P(parallel.DP))
  f32 = lambda b: rows((b,), jnp.float32)
  # Every setting the engine passes: min_p, logprobs, the penalties, prompt lengths.
  sampling = lambda b: SamplingArrays(f32(b), rows((b,)), f32(b), rows((b,), jnp.uint32),
                                      f32(b), rows((b,)), f32(b), f32(b), f32(b), rows((b,)))
  history = lambda b: rows((b, cfg.vocab_size))
  params = loading.abstract_on_mesh(cfg, mesh).params
  pool_shape = (parallel.pool_kv_heads(cfg, mesh), PAGES, PAGE_SIZE, cfg.head_dim)
  pool = [kv_cache.LayerPages(_spec(mesh, pool_shape, jnp.bfloat16, parallel.POOL_SPEC),
                              _spec(mesh, pool_shape, jnp.bfloat16, parallel.POOL_SPEC))
          for _ in range(cfg.num_layers)]
  b, s = PREFILL
  dense = parallel.dense_kv_spec(cfg, mesh)
  prompt_kv = [kv_cache.LayerKV(_spec(mesh, (b, s, cfg.num_kv_heads, cfg.head_dim),
                                      jnp.bfloat16, dense),
                                _spec(mesh, (b, s, cfg.num_kv_heads, cfg.head_dim),
                                      jnp.bfloat16, dense)) for _ in range(cfg.num_layers)]
  block = jax.ShapeDtypeStruct(plan.layout.shape(s, 1), jnp.bfloat16,
                               sharding=plan.decode_sharding)
  hidden = _spec(mesh, (b, s, cfg.hidden_size), jnp.bfloat16, P(parallel.DP))
  first, rest = steps.prefill_groups(((0, 1), (1, cfg.num_layers)))
  scalar = _spec(mesh, (), jnp.int32)
  bc, c = CHUNKS
  extract = steps.make_extract(plan)
  return {
      "prefill": (steps.prefill, (params, rows((b, s)), rows((b,)), sampling(b))),
      "insert": (steps.insert, (pool, prompt_kv, rows((b, s // PAGE_SIZE)))),
      "decode": (steps.decode, (params, pool, rows((BATCH,)), rows((BATCH,)),
                                rows((BATCH, WIDTH)), sampling(BATCH), rows((BATCH // 2,)),
                                history(BATCH))),
      "prefill_group_first": (first, (params, rows((b, s)), rows((b,)), sampling(b))),
      "prefill_group_last": (rest, (params, (hidden, rows((b, s))), rows((b,)), sampling(b))),
      "extract": (extract, (prompt_kv, scalar, scalar)),
      "insert_block": (steps.insert_block, (pool[:1], block,
                                            _spec(mesh, (s // PAGE_SIZE,), jnp.int32))),
      "set_token": (steps.set_token, (rows((BATCH,)), scalar, scalar)),
      "set_history": (steps.set_history, (history(BATCH), scalar,
                                          _spec(mesh, (cfg.vocab_size,), jnp.int32))),
      "mixed": (steps.mixed, (params, pool, rows((BATCH,)), rows((BATCH,)),
                              rows((BATCH, WIDTH)), sampling(BATCH), rows((bc, c)), rows((bc,)),
                              rows((bc,)), rows((bc,)), rows((bc,), jnp.bool_), history(BATCH))),
  }


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_every_step_lowers(platform, mesh_name):
  device, backend, target = PLATFORMS[platform]
  dp, tp, cfg = MESHES[mesh_name]
  mesh = AbstractMesh((dp, tp), (parallel.DP, parallel.TP), abstract_device=device)
  model = loading.abstract_on_mesh(cfg, mesh)
  steps = ModelSteps(model, page_size=PAGE_SIZE, attention_impl="auto")
  plan = TransferPlan(cfg, mesh, mesh)
  disabled = [jax.export.DisabledSafetyCheck.custom_call(target)] if platform == "cuda" else []
  failures = {}
  # The context mesh tells Mosaic the TPU generation where no shard_map does (a 1x1 mesh).
  with dispatch.lowering_for(backend), use_abstract_mesh(mesh):
    for name, (step, args) in _step_args(steps, plan).items():
      try:
        exported = jax.export.export(step.jitted, platforms=[platform],
                                     disabled_checks=disabled)(*args)
      except Exception as e:  # pylint: disable=broad-except
        failures[name] = f"{type(e).__name__}: {str(e)[:300]}"
        continue
      assert exported.nr_devices == dp * tp, name
      inside, outside = _kernel_calls(exported, target)
      if name in ("prefill", "decode", "mixed") or name.startswith("prefill_group"):
        assert inside + outside > 0, f"{name}: no {target} call: the kernel was not used"
        if dp * tp > 1:
          assert outside == 0, f"{name}: {outside} kernel calls outside shard_map"
      else:
        assert inside + outside == 0, f"{name} calls a kernel"
  assert not failures, failures
