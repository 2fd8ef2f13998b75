"""How one request's KV travels from the prefill mesh to the decode mesh: whole buffers, one copy.

A request's KV is [L, 2, S, Hkv, D]. The decode mesh splits the KV heads into `d` blocks over its
tp axis (d = 1 when it replicates them); the prefill mesh into `p`. The plan arranges the prefill
side's `extract` to emit exactly the buffers the decode devices need, so the transfer itself is one
plain device-to-device copy per decode device, and no byte is sliced, concatenated or staged on the
host in between:

  p >= d: one array [d, L, 2, S, Hkv/d, D]; block j is gathered (inside `extract`, on device) onto
          each of the p/d prefill devices that held its pieces;
  p <  d: r = d/p arrays [p, L, 2, S, Hkv/d, D]; array k's block on prefill device i is the KV of
          decode block i*r + k, which that device already holds.

On the decode mesh the KV arrives as [d, L, 2, S, Hkv/d, D] sharded on its first axis, and
`unpack` (inside the insert step) turns it back into [L, 2, S, Hkv, D] without communication.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from disagg_jax import parallel
from disagg_jax.shapes import ModelShape


def kv_blocks(cfg: ModelShape, mesh: Mesh) -> int:
  """How many distinct KV-head blocks `mesh` holds (1 when it replicates the heads)."""
  return parallel.tp_size(mesh) if parallel.kv_heads_sharded(cfg, mesh) else 1


class TransferPlan:
  """The transfer layout between one prefill mesh and one decode mesh. Across processes the
  decode mesh is not visible: give `decode_blocks` (its `kv_blocks`) instead, offer
  `source_blocks(...)` for pulling, and let the decode side's `DecodeLayout` assemble them."""

  def __init__(self, cfg: ModelShape, prefill_mesh: Mesh, decode_mesh: Mesh | None = None, *,
               decode_blocks: int | None = None):
    self.cfg = cfg
    self.p = kv_blocks(cfg, prefill_mesh)
    self.d = kv_blocks(cfg, decode_mesh) if decode_mesh is not None else decode_blocks
    if self.d is None or cfg.num_kv_heads % self.d:
      raise ValueError(f"decode side must split {cfg.num_kv_heads} KV heads evenly, got "
                       f"{self.d} blocks")
    if max(self.p, self.d) % min(self.p, self.d):
      raise ValueError(f"prefill KV blocks ({self.p}) and decode KV blocks ({self.d}) must "
                       "divide one another")
    self.decode_mesh = decode_mesh
    if self.p >= self.d:
      # Same devices as the prefill mesh, with tp split into (decode block, replica in group).
      self.source_shardings = [NamedSharding(_grouped(prefill_mesh, self.d), P("block"))]
    else:
      spec = P(parallel.TP) if self.p > 1 else P()
      self.source_shardings = [NamedSharding(prefill_mesh, spec)] * (self.d // self.p)
    self.layout = DecodeLayout(cfg, decode_mesh) if decode_mesh is not None else None
    self.decode_sharding = self.layout.sharding if self.layout else None

  # ------------------------------------------------------------------ inside jit

  def pack(self, kv: jax.Array) -> list[jax.Array]:
    """Prefill side, inside `extract`: [L, 2, S, Hkv, D] -> the arrays of the source layout."""
    L, two, s, hkv, d = kv.shape
    blocks = jnp.moveaxis(kv.reshape(L, two, s, self.d, hkv // self.d, d), 3, 0)
    if self.p >= self.d:
      return [jax.lax.with_sharding_constraint(blocks, self.source_shardings[0])]
    r = self.d // self.p
    # Decode block i*r + k sits on prefill device i: array k takes every r-th block from k.
    return [jax.lax.with_sharding_constraint(blocks[k::r], sharding)
            for k, sharding in enumerate(self.source_shardings)]

  @staticmethod
  def unpack(blocks: jax.Array) -> jax.Array:
    """Decode side, inside the insert step: [d, L, 2, S, Hkv/d, D] -> [L, 2, S, Hkv, D]."""
    d, L, two, s, h, dim = blocks.shape
    return jnp.moveaxis(blocks, 0, 3).reshape(L, two, s, d * h, dim)

  # ------------------------------------------------------------------ the transfer

  def transfer(self, arrays: list[jax.Array]) -> jax.Array:
    """The packed arrays -> [d, L, 2, S, Hkv/d, D] on the decode mesh, one copy per device."""
    return self.transfer_many([arrays])[0]

  def transfer_many(self, items: list[list[jax.Array]]) -> list[jax.Array]:
    """Several requests' (or pieces') packed arrays at once: every copy of all of them in one
    `jax.device_put` call (one host dispatch for the batch), one array per item."""
    sources, devices, shapes = [], [], []
    for arrays in items:
      shape = (self.d,) + arrays[0].shape[1:]
      shapes.append(shape)
      for k, i, device in self._routes(shape):
        sources.append(arrays[k].addressable_data(i))
        devices.append(device)
    moved = iter(jax.device_put(sources, devices))
    return [jax.make_array_from_single_device_arrays(
        shape, self.decode_sharding, [next(moved) for _ in range(len(self._routes(shape)))])
            for shape in shapes]

  def source_blocks(self, arrays: list[jax.Array]) -> list[jax.Array]:
    """The packed arrays as d single-device buffers, block j holding decode block j (what a
    prefill process offers for a decode process to pull)."""
    holders = self._holders((self.d,) + arrays[0].shape[1:])
    return [arrays[k].addressable_data(i) for k, i in (holders[j][0] for j in range(self.d))]

  @functools.lru_cache(maxsize=64)
  def _holders(self, shape) -> dict[int, list[tuple[int, int]]]:
    """Decode block -> every (source array, index of its single-device buffer) holding it."""
    r = 1 if self.p >= self.d else self.d // self.p
    holders: dict[int, list[tuple[int, int]]] = {}
    for k, sharding in enumerate(self.source_shardings):
      source_shape = (self.d // len(self.source_shardings),) + shape[1:]
      for i, index in enumerate(sharding.addressable_devices_indices_map(source_shape).values()):
        start = index[0].indices(source_shape[0])[0]
        holders.setdefault(start * r + k, []).append((k, i))
    return holders

  @functools.lru_cache(maxsize=64)
  def _routes(self, shape) -> list[tuple[int, int, jax.Device]]:
    """For each decode device in order: (source array, index of its single-device buffer that
    holds exactly that device's block, the device). Replicated sources are used round robin."""
    holders = self._holders(shape)
    routes = []
    for n, (device, index) in enumerate(
        self.decode_sharding.addressable_devices_indices_map(shape).items()):
      replicas = holders[index[0].indices(self.d)[0]]
      routes.append(replicas[n % len(replicas)] + (device,))
    return routes



def _grouped(mesh, blocks: int):
  """`mesh` [dp, tp] seen as [dp, blocks, tp / blocks] ("dp", "block", "replica"). An abstract
  mesh (for lowering to another platform) gives an abstract one."""
  dp, tp = mesh.shape[parallel.DP], mesh.shape[parallel.TP]
  names = ("dp", "block", "replica")
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.sharding.AbstractMesh((dp, blocks, tp // blocks), names,
                                     abstract_device=mesh.abstract_device)
  return Mesh(mesh.devices.reshape(dp, blocks, tp // blocks), names)


class DecodeLayout:
  """The decode side of a transfer: where each of the d blocks [1, L, 2, S, Hkv/d, D] lives, and
  how pulled blocks become the [d, L, 2, S, Hkv/d, D] array the insert step takes."""

  def __init__(self, cfg: ModelShape, decode_mesh: Mesh):
    self.cfg = cfg
    self.d = kv_blocks(cfg, decode_mesh)
    self.sharding = NamedSharding(decode_mesh, P(parallel.TP) if self.d > 1 else P())

  def shape(self, num_tokens: int, num_layers: int | None = None) -> tuple[int, ...]:
    cfg = self.cfg
    return (self.d, num_layers or cfg.num_layers, 2, num_tokens, cfg.num_kv_heads // self.d,
            cfg.head_dim)

  def pull_specs(self, num_tokens: int, dtype, num_layers: int | None = None
                 ) -> list[jax.ShapeDtypeStruct]:
    """One single-device spec per block, on the first decode device that holds it."""
    shape = self.shape(num_tokens, num_layers)
    first = {}
    for device, index in self.sharding.addressable_devices_indices_map(shape).items():
      first.setdefault(index[0].indices(self.d)[0], device)
    block = (1,) + shape[1:]
    return [jax.ShapeDtypeStruct(block, dtype, sharding=jax.sharding.SingleDeviceSharding(
        first[j])) for j in range(self.d)]

  def assemble(self, blocks: list[jax.Array]) -> jax.Array:
    """Pulled blocks (block j on its first device) -> the decode array; replicas (dp > 1, or
    replicated heads) are local copies."""
    shape = (self.d,) + blocks[0].shape[1:]
    pieces = [jax.device_put(blocks[index[0].indices(self.d)[0]], device) for device, index in
              self.sharding.addressable_devices_indices_map(shape).items()]
    return jax.make_array_from_single_device_arrays(shape, self.sharding, pieces)
