"""The paged KV cache as pure functions over explicit arrays (one device's part of it).

Per layer the pool is `LayerPages(k, v)`, each `[Hkv, num_pages, page_size, D]` (the kernel
contract's layout). A sequence's tokens live in the pages its page-table row names, in order:
position p is page `page_table[b, p // page_size]`, offset `p % page_size`. Writes for padding or
inactive rows are aimed one past the last page and dropped by the scatter, so no slot is reserved.
How a mesh splits the pool, and which of these run per shard, is `disagg_jax.kv.layout`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerPages(NamedTuple):
  k: jax.Array  # [Hkv, num_pages, page_size, D]
  v: jax.Array  # [Hkv, num_pages, page_size, D]


KVPages = list  # list[LayerPages], one per layer


class LayerKV(NamedTuple):
  """A prefilled prompt's dense keys and values for one layer."""
  k: jax.Array  # [B, S, Hkv, D]
  v: jax.Array  # [B, S, Hkv, D]


def init_pages(num_layers: int, num_kv_heads: int, num_pages: int, page_size: int,
               head_dim: int, dtype) -> KVPages:
  shape = (num_kv_heads, num_pages, page_size, head_dim)
  return [LayerPages(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(num_layers)]


def token_slots(page_table: jax.Array, positions: jax.Array, valid: jax.Array,
                num_pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
  """page_table int32[B, P]; positions, valid: [B, ...] -> (page ids, offsets) shaped like positions.

  Invalid tokens get page id `num_pages`, which the scatter drops.
  """
  b = page_table.shape[0]
  page_index = jnp.clip(positions // page_size, 0, page_table.shape[1] - 1)
  flat_index = page_index.reshape(b, -1)
  page_ids = jnp.take_along_axis(page_table, flat_index, axis=1).reshape(positions.shape)
  page_ids = jnp.where(valid, page_ids, num_pages)
  return page_ids, positions % page_size


def localize(page_ids: jax.Array, num_local_pages: int, offset) -> jax.Array:
  """Global page ids -> ids within a shard holding pages [offset, offset + num_local_pages);
  ids outside it (another shard's pages, the drop marker) become num_local_pages (dropped)."""
  local = page_ids - offset
  return jnp.where((local >= 0) & (local < num_local_pages), local, num_local_pages)


def write_tokens(pages: LayerPages, k: jax.Array, v: jax.Array, page_ids: jax.Array,
                 offsets: jax.Array) -> LayerPages:
  """k, v: [..., Hkv, D] new tokens; page_ids, offsets: int32[...] -> pages with them written."""
  hkv, d = k.shape[-2:]
  k = k.reshape(-1, hkv, d).swapaxes(0, 1).astype(pages.k.dtype)  # [Hkv, N, D]
  v = v.reshape(-1, hkv, d).swapaxes(0, 1).astype(pages.v.dtype)
  page_ids, offsets = page_ids.reshape(-1), offsets.reshape(-1)
  return LayerPages(
      pages.k.at[:, page_ids, offsets].set(k, mode="drop"),
      pages.v.at[:, page_ids, offsets].set(v, mode="drop"),
  )


def write_prompt(pages: LayerPages, kv: LayerKV, page_ids: jax.Array) -> LayerPages:
  """Writes whole prompts into whole pages.

  kv: [B, S, Hkv, D] with S a multiple of page_size; page_ids: int32[B, S // page_size], with
  `num_pages` (dropped) for pages past a prompt's end.
  """
  _, num_pages, page_size, _ = pages.k.shape
  del num_pages

  def to_pages(x):  # [B, S, Hkv, D] -> [Hkv, B * S/ps, ps, D]
    b, s, hkv, d = x.shape
    x = x.reshape(b * (s // page_size), page_size, hkv, d)
    return jnp.transpose(x, (2, 0, 1, 3)).astype(pages.k.dtype)

  flat_ids = page_ids.reshape(-1)
  return LayerPages(
      pages.k.at[:, flat_ids].set(to_pages(kv.k), mode="drop"),
      pages.v.at[:, flat_ids].set(to_pages(kv.v), mode="drop"),
  )
