"""Moving arrays between meshes device to device, whatever their shardings.

`jax.device_put` from one mesh to another copies device to device only when both shardings cut the
array at the same boundaries; otherwise (prefill TP4 -> decode TP2, say) it silently pulls the whole
array through host memory. `reshard` avoids that: for every device of the target sharding it finds
the source shards overlapping that device's block, slices each on its own device, copies the slice
single-device to single-device (a direct copy), and assembles the block on the target device. The
result is built with `jax.make_array_from_single_device_arrays`, so no byte visits the host.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Sharding

Box = tuple[tuple[int, int], ...]  # per axis [start, stop)


def _box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _intersect(a: Box, b: Box) -> Box | None:
  out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
  return out if all(lo < hi for lo, hi in out) else None


def _relative(inner: Box, outer: Box) -> tuple[slice, ...]:
  return tuple(slice(i0 - o0, i1 - o0) for (i0, i1), (o0, _) in zip(inner, outer))


def _pieces_for(target: Box, sources: dict[Box, list[jax.Array]], counter):
  """The source blocks covering `target`, each as (intersection box, one replica's shard)."""
  pieces = []
  for box, replicas in sources.items():
    overlap = _intersect(box, target)
    if overlap is not None:
      # Spread reads over replicas (a replicated source has one per device).
      pieces.append((overlap, box, replicas[next(counter) % len(replicas)]))
  return pieces


def _assemble(parts, target: Box, dtype, device) -> jax.Array:
  """One block from pieces already on `device`: a concatenation when they tile it along a single
  axis (the usual head split), else scattered into a zero block."""
  varying = [a for a in range(len(target)) if len({p[0][a] for p in parts}) > 1]
  if len(varying) == 1:
    axis = varying[0]
    parts = sorted(parts, key=lambda p: p[0][axis][0])
    return jnp.concatenate([data for _, data in parts], axis=axis)
  block = jnp.zeros([hi - lo for lo, hi in target], dtype, device=device)
  for overlap, data in parts:
    block = block.at[_relative(overlap, target)].set(data)
  return block


def reshard_array(x: jax.Array, sharding: Sharding) -> jax.Array:
  """`x` laid out as `sharding` (possibly on other devices), copied device to device."""
  if x.sharding == sharding:
    return x
  shape = x.shape
  sources: dict[Box, list[jax.Array]] = {}
  for shard in x.addressable_shards:
    sources.setdefault(_box(shard.index, shape), []).append(shard.data)
  counter = itertools.count()
  blocks = []
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    target = _box(index, shape)
    pieces = _pieces_for(target, sources, counter)
    if len(pieces) == 1:  # one source block holds all of it: slice (if needed) and copy
      overlap, box, data = pieces[0]
      part = data if overlap == box else data[_relative(overlap, box)]
      blocks.append(jax.device_put(part, device))
      continue
    parts = [(overlap, jax.device_put(data[_relative(overlap, box)], device))  # sliced at source
             for overlap, box, data in pieces]
    blocks.append(_assemble(parts, target, x.dtype, device))
  return jax.make_array_from_single_device_arrays(shape, sharding, blocks)


def reshard(tree: Any, shardings: Any) -> Any:
  """Every array of `tree` into the matching sharding of `shardings` (a tree or one sharding)."""
  if isinstance(shardings, Sharding):
    return jax.tree.map(lambda x: reshard_array(x, shardings), tree)
  return jax.tree.map(reshard_array, tree, shardings)
