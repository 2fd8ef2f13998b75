"""Moving KV pytrees between meshes (device to device, any pair of shardings)."""

from disagg_jax.transfer.reshard import reshard, reshard_array

__all__ = ["reshard", "reshard_array"]
