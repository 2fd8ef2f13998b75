"""Attention for disagg_jax: Pallas kernels (TPU and GPU), their pure-JAX references, and the
dispatch between them (`attention_impl=auto|xla|pallas`)."""

from pallas_kernels import dispatch
from pallas_kernels import reference
from pallas_kernels.dispatch import IMPLS, resolve_impl
from pallas_kernels.kernels import (chunked_prefill_attention, paged_decode_attention,
                                    prefill_attention, ragged_paged_attention)

__all__ = ["dispatch", "reference", "IMPLS", "resolve_impl", "prefill_attention",
           "paged_decode_attention", "chunked_prefill_attention", "ragged_paged_attention"]
