"""Meshes and sharding rules for each phase."""

from disagg_jax.parallel.mesh import (DP, TP, check_tp, dense_kv_sharding, kv_heads_sharded,
                                      kv_pages_sharding, make_mesh, param_sharding, param_spec,
                                      pick_devices, replicated, tp_size)

__all__ = ["DP", "TP", "check_tp", "dense_kv_sharding", "kv_heads_sharded", "kv_pages_sharding",
           "make_mesh", "param_sharding", "param_spec", "pick_devices",
           "replicated", "tp_size"]
