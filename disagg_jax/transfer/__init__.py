"""Moving KV pytrees between meshes, device to device, for any pair of shardings."""

from disagg_jax.transfer.plan import DecodeLayout, TransferPlan, kv_blocks
from disagg_jax.transfer.reshard import reshard, reshard_array

__all__ = ["DecodeLayout", "TransferPlan", "kv_blocks", "reshard", "reshard_array"]
