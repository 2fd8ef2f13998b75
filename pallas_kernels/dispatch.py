"""The one attention dispatch point: `impl` picks the Pallas kernel or the pure-JAX reference.

`auto` means Pallas on TPU and GPU and the XLA reference on CPU (where Pallas only interprets).
"""

from __future__ import annotations

import jax

from pallas_kernels import reference

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """'auto' | 'xla' | 'pallas' -> 'xla' | 'pallas' for `platform` (default: JAX's backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  return "pallas" if platform in ("tpu", "gpu", "cuda", "rocm") else "xla"


def _pallas():
  try:
    from pallas_kernels import kernels  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise NotImplementedError(f"the Pallas attention kernels are not available: {e}") from None
  return kernels


def prefill(q, k, v, lengths, *, impl: str, causal: bool = True, sm_scale=None):
  """q: [B, S, Hq, D], k/v: [B, S, Hkv, D], lengths: int32[B] -> [B, S, Hq, D]."""
  if resolve_impl(impl) == "pallas":
    return _pallas().prefill_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale,
                                       interpret=_interpret())
  return reference.prefill_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale)


def paged_decode(q, k_pages, v_pages, lengths, page_table, *, impl: str, sm_scale=None):
  """q: [B, Hq, D], pages: [Hkv, P, page_size, D] -> [B, Hq, D]."""
  if resolve_impl(impl) == "pallas":
    return _pallas().paged_decode_attention(q, k_pages, v_pages, lengths, page_table,
                                            sm_scale=sm_scale, interpret=_interpret())
  return reference.paged_decode_attention(q, k_pages, v_pages, lengths, page_table,
                                          sm_scale=sm_scale)


def chunked_prefill(q, k_pages, v_pages, context_lens, chunk_lens, page_table, *, impl: str,
                    sm_scale=None):
  """q: [B, C, Hq, D] against cached pages plus itself, causally -> [B, C, Hq, D]."""
  if resolve_impl(impl) == "pallas":
    return _pallas().chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens,
                                               page_table, sm_scale=sm_scale,
                                               interpret=_interpret())
  return reference.chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens,
                                             page_table, sm_scale=sm_scale)


def _interpret() -> bool:
  """Pallas interprets on CPU; real backends compile the kernel."""
  return jax.default_backend() == "cpu"
