"""Prefill and decode workers in separate processes (Ray), KV moved with jax.experimental.transfer."""
