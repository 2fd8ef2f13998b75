"""Attention for disagg_jax: Pallas kernels, their pure-JAX references, and the dispatch between them."""

from pallas_kernels import dispatch
from pallas_kernels import reference
from pallas_kernels.dispatch import IMPLS, resolve_impl

__all__ = ["dispatch", "reference", "IMPLS", "resolve_impl"]
