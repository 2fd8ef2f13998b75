"""Meshes and sharding rules for each phase."""

from disagg_jax.parallel.mesh import (DP, POOL_SPEC, TP, allows_tp, batch_sharding, check_tp,
                                      dense_kv_sharding, dense_kv_spec, dp_size,
                                      kv_heads_sharded, kv_pages_sharding, make_mesh,
                                      param_sharding, param_spec, pick_devices, pool_kv_heads,
                                      replicated, tp_size)

__all__ = ["DP", "POOL_SPEC", "TP", "allows_tp", "batch_sharding", "check_tp", "dense_kv_sharding",
           "dense_kv_spec", "dp_size", "kv_heads_sharded", "kv_pages_sharding", "make_mesh",
           "param_sharding", "param_spec", "pick_devices", "pool_kv_heads", "replicated",
           "tp_size"]
