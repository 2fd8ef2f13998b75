"""How a mesh holds the page pool, and running the pool's per-shard code on it.

Per layer the pool is [pool heads, pages, page_size, D] (`parallel.POOL_SPEC`):
- heads over tp: the model's KV heads, or tp of them when tp exceeds them (each KV head stored
  tp / Hkv times, one copy per shard that needs it), so each device keeps only the heads its
  query heads read;
- pages over dp: dp row r holds the block of global pages [r * Pl, (r + 1) * Pl). The batch's rows
  split over dp the same way (rows [r * B / dp, (r + 1) * B / dp) on dp row r), and a row's pages
  always come from its dp row's block (`engine.slots.DecodeSlots`). Page 0 of every block is that
  block's scratch page.
Page tables hold global page ids. Inside a shard, writes keep only the ids of the shard's own block
(`kv.cache.localize`); reads take ids modulo Pl, which maps a row's own pages and the scratch
page 0 to the block's local ids.

Everything that touches pages or calls an attention kernel runs per shard under `shard_map`
(`PoolLayout.run`): XLA cannot partition a Pallas kernel, and a scatter into a dp-sharded pool
with global ids would otherwise gather the pool.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from disagg_jax import parallel
from disagg_jax.kv import cache as kv_cache
from disagg_jax.shapes import ModelShape

DP, TP = parallel.DP, parallel.TP
ROWS = P(DP)  # per-row arrays
HEADS = P(DP, None, TP, None)  # [B, S, heads, D], rows over dp and heads over tp


@dataclasses.dataclass(frozen=True)
class PoolLayout:
  """The pool's layout on `mesh` for a model with `num_kv_heads` KV heads."""
  mesh: Mesh
  num_kv_heads: int
  pool_heads: int

  @classmethod
  def create(cls, cfg: ModelShape, mesh: Mesh) -> "PoolLayout":
    return cls(mesh, cfg.num_kv_heads, parallel.pool_kv_heads(cfg, mesh))

  @property
  def dp(self) -> int:
    return parallel.dp_size(self.mesh)

  @property
  def tp(self) -> int:
    return parallel.tp_size(self.mesh)

  @property
  def sharded(self) -> bool:
    return self.mesh.size > 1

  def expand_heads(self, x: jax.Array) -> jax.Array:
    """[..., Hkv, D] -> [..., pool heads, D]: each KV head repeated for the shards that read it."""
    repeat = self.pool_heads // self.num_kv_heads
    return jnp.repeat(x, repeat, axis=-2) if repeat > 1 else x

  def run(self, fn, in_specs, out_specs, *args):
    """fn(*args) on each device's shards (specs over the mesh's dp and tp axes); directly on a
    one-device mesh. `fn` finds its own block of pages with `page_offset`."""
    if not self.sharded:
      return fn(*args)
    return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)

  def page_offset(self, num_local_pages: int):
    """Inside `run`: the first global page id of this shard's block."""
    if self.dp == 1:
      return 0
    return jax.lax.axis_index(DP) * num_local_pages

  def local_table(self, page_table: jax.Array, num_local_pages: int) -> jax.Array:
    """Inside `run`: a page table of this shard's rows, in local page ids."""
    return page_table % num_local_pages if self.dp > 1 else page_table

  def write_prompts(self, kv_pages: list, prompt_kv: list, page_ids: jax.Array,
                    rows_sharded: bool = True) -> list:
    """Writes whole prompts into whole pages, every layer: prompt_kv list[LayerKV [B, S, Hkv, D]]
    (rows split over dp when `rows_sharded`, else one copy on every dp row), page_ids
    int32[B, S / page_size] global ids (num_pages: skip)."""
    prompt_kv = [kv_cache.LayerKV(self.expand_heads(kv.k), self.expand_heads(kv.v))
                 for kv in prompt_kv]

    def write(kv_pages, prompt_kv, page_ids):
      num_local = kv_pages[0].k.shape[1]
      local = kv_cache.localize(page_ids, num_local, self.page_offset(num_local))
      return [kv_cache.write_prompt(pages, kv, local) for pages, kv in zip(kv_pages, prompt_kv)]

    rows = DP if rows_sharded else None
    return self.run(write, (parallel.POOL_SPEC, P(rows, None, TP, None), P(rows)),
                    parallel.POOL_SPEC, kv_pages, prompt_kv, page_ids)


def init_pages(cfg: ModelShape, layout: PoolLayout, num_pages: int, page_size: int, dtype
               ) -> kv_cache.KVPages:
  """A zeroed pool of `num_pages` pages (a multiple of dp: equal blocks per dp row), created in
  place on the mesh."""
  if num_pages % layout.dp:
    raise ValueError(f"num_pages={num_pages} must split evenly over dp={layout.dp}")
  make = jax.jit(lambda: kv_cache.init_pages(cfg.num_layers, layout.pool_heads, num_pages,
                                             page_size, cfg.head_dim, dtype),
                 out_shardings=parallel.kv_pages_sharding(layout.mesh))
  return make()
