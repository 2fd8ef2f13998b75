"""Device meshes and the sharding rules of each phase (Megatron-style tensor parallelism).

A mesh has axes ("dp", "tp"): "tp" shards attention heads and the MLP's hidden dimension; "dp"
replicates the model and splits the batch, and with it the page pool: each dp row owns the pages
of its own rows of the batch (see `disagg_jax.kv.layout`). Rules are keyed by parameter name, so a
new parameter gets a sharding by adding one line.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from disagg_jax.shapes import ModelShape

DP, TP = "dp", "tp"


def make_mesh(devices: Sequence[jax.Device], tp: int) -> Mesh:
  """A (dp, tp) mesh over `devices`; len(devices) must be a multiple of tp."""
  devices = list(devices)
  if tp <= 0 or len(devices) % tp:
    raise ValueError(f"tp={tp} must be positive and divide the mesh's {len(devices)} devices")
  return Mesh(np.array(devices).reshape(len(devices) // tp, tp), (DP, TP))


def pick_devices(spec, available: Sequence[jax.Device] | None = None, start: int = 0
                 ) -> list[jax.Device]:
  """`spec` is a count (taken from `start`) or explicit device ids ("0,1,2,3" or a list)."""
  available = list(available if available is not None else jax.devices())
  if isinstance(spec, str) and "," in spec:
    spec = [int(s) for s in spec.split(",") if s.strip()]
  if isinstance(spec, (list, tuple)):
    by_id = {d.id: d for d in available}
    missing = [i for i in spec if i not in by_id]
    if missing:
      raise ValueError(f"device ids {missing} do not exist; available: {sorted(by_id)}")
    return [by_id[i] for i in spec]
  count = int(spec)
  if count <= 0 or start + count > len(available):
    raise ValueError(
        f"asked for {count} devices starting at {start}, but only {len(available)} exist "
        f"(on CPU, simulate more with --num_cpu_devices)")
  return available[start:start + count]


def tp_size(mesh: Mesh) -> int:
  return mesh.shape[TP]


def dp_size(mesh: Mesh) -> int:
  return mesh.shape[DP]


def kv_heads_sharded(cfg: ModelShape, mesh: Mesh) -> bool:
  """Dense K/V (the projections' output, what prefill hands over) split their heads over tp when
  they divide evenly; otherwise every tp shard computes all of them."""
  return cfg.num_kv_heads % tp_size(mesh) == 0


def pool_kv_heads(cfg: ModelShape, mesh: Mesh) -> int:
  """KV heads of the page pool: the model's, or tp of them when tp exceeds them, each KV head
  then stored once per tp shard that needs it (tp / Hkv copies), as vLLM does. Either way the
  pool's heads split evenly over tp, so every device keeps only the heads its queries read."""
  return max(cfg.num_kv_heads, tp_size(mesh))


def check_tp(cfg: ModelShape, tp: int) -> None:
  if cfg.num_heads % tp:
    raise ValueError(f"tp={tp} does not divide the model's {cfg.num_heads} attention heads")
  if cfg.intermediate_size % tp:
    raise ValueError(f"tp={tp} does not divide intermediate_size={cfg.intermediate_size}")
  if cfg.num_kv_heads % tp and tp % cfg.num_kv_heads:
    raise ValueError(f"tp={tp} and the model's {cfg.num_kv_heads} KV heads must divide one another")


def allows_tp(cfg: ModelShape, tp: int) -> bool:
  """Whether the model can run at tensor parallelism `tp` (`check_tp` passes)."""
  try:
    check_tp(cfg, tp)
  except ValueError:
    return False
  return True


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
  """The PartitionSpec of the parameter at `path` (names from `disagg_jax.models.llama`).

  A dimension that tp does not divide (a vocabulary of 1000 on tp=8, two KV heads on tp=4) stays
  whole on every device instead.
  """
  rules = {
      "wq": P(None, TP, None), "bq": P(TP, None),
      "wk": P(None, TP, None), "bk": P(TP, None),
      "wv": P(None, TP, None), "bv": P(TP, None),
      "wo": P(TP, None, None),
      "w_gate": P(None, TP), "b_gate": P(TP),
      "w_up": P(None, TP), "b_up": P(TP),
      "w_down": P(TP, None),
      "lm_head": P(None, TP),
  }
  spec = rules.get(path[-1], P())
  if len(spec) not in (0, len(shape)):
    raise ValueError(f"sharding rule for {'/'.join(path)} has rank {len(spec)}, "
                     f"the array has shape {shape}")
  tp = tp_size(mesh)
  return P(*(axis if axis is None or shape[i] % tp == 0 else None for i, axis in enumerate(spec)))


def param_sharding(path, shape, mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, param_spec(tuple(str(p) for p in path), tuple(shape), mesh))


POOL_SPEC = P(TP, DP)  # page pools [pool heads, pages, page_size, D]


def kv_pages_sharding(mesh: Mesh) -> NamedSharding:
  """Page pools [pool_kv_heads, P, page_size, D]: heads over tp, pages over dp (each dp row
  holds its own block of pages)."""
  return NamedSharding(mesh, POOL_SPEC)


def dense_kv_spec(cfg: ModelShape, mesh: Mesh) -> P:
  """Prefilled KV [B, S, Hkv, D]: rows over dp, heads over tp when they divide."""
  return P(DP, None, TP if kv_heads_sharded(cfg, mesh) else None)


def dense_kv_sharding(cfg: ModelShape, mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, dense_kv_spec(cfg, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Per-row arrays (tokens, positions, page tables, sampling settings): rows over dp."""
  return NamedSharding(mesh, P(DP))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
