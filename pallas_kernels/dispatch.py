"""The one attention dispatch point: `impl` picks the Pallas kernel or the pure-JAX reference.

`auto` means Pallas on TPU and GPU and the XLA reference on CPU (where Pallas only interprets).
Per platform, Pallas means: prefill `tpu_prefill` / the GPU flash kernel; paged decode the ragged
work-list kernel `tpu_ragged` on TPU (`kernels.paged_decode_attention`'s TPU default) / the GPU
paged kernel; chunked prefill `tpu_paged` / the GPU chunked kernel.
Every function here works on one device's arrays: callers on a multi-device mesh run them inside
`shard_map` (see `disagg_jax.engine.attention`), because XLA cannot partition a Pallas kernel.

`lowering_for("tpu" | "gpu")` makes the dispatch choose and compile (not interpret) that
platform's kernels whatever backend this process runs, so a CPU-only machine can lower the
engine's steps for TPU and GPU with `jax.export`.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

from pallas_kernels import kernels, reference

IMPLS = ("auto", "xla", "pallas")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)
# The XLA path computes prefill attention in blocks of this many queries once prompts are longer
# than two blocks, so its scores take [block, S] per head instead of [S, S].
XLA_QUERY_BLOCK = 512


@contextlib.contextmanager
def lowering_for(platform: str):
  """Within this context, 'auto' means Pallas and kernels compile for `platform` ('tpu' or 'gpu')."""
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"platform={platform!r} is not one of tpu, gpu")
  token = _TARGET.set(platform)
  try:
    yield
  finally:
    _TARGET.reset(token)


def _platform() -> str:
  return _TARGET.get() or jax.default_backend()


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """'auto' | 'xla' | 'pallas' -> 'xla' | 'pallas' for `platform` (default: JAX's backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  platform = platform or _platform()
  return "pallas" if platform in ("tpu", "gpu", "cuda", "rocm") else "xla"


def _kernel_options() -> dict:
  """Pallas interprets on CPU; real backends (or a lowering target) compile the kernel."""
  target = _TARGET.get()
  if target is not None:
    return {"interpret": False, "backend": target}
  return {"interpret": jax.default_backend() == "cpu"}


def prefill(q, k, v, lengths, *, impl: str, causal: bool = True, sm_scale=None):
  """q: [B, S, Hq, D], k/v: [B, S, Hkv, D], lengths: int32[B] -> [B, S, Hq, D]."""
  if resolve_impl(impl) == "xla":
    return reference.prefill_attention_blocked(q, k, v, lengths, causal=causal,
                                               sm_scale=sm_scale, block=XLA_QUERY_BLOCK)
  return kernels.prefill_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale,
                                   **_kernel_options())


def paged_decode(q, k_pages, v_pages, lengths, page_table, *, impl: str, sm_scale=None):
  """q: [B, Hq, D], pages: [Hkv, P, page_size, D] -> [B, Hq, D]."""
  if resolve_impl(impl) == "xla":
    return reference.paged_decode_attention(q, k_pages, v_pages, lengths, page_table,
                                            sm_scale=sm_scale)
  return kernels.paged_decode_attention(q, k_pages, v_pages, lengths, page_table,
                                        sm_scale=sm_scale, **_kernel_options())


def chunked_prefill(q, k_pages, v_pages, context_lens, chunk_lens, page_table, *, impl: str,
                    sm_scale=None):
  """q: [B, C, Hq, D] against cached pages plus itself, causally -> [B, C, Hq, D]."""
  if resolve_impl(impl) == "xla":
    return reference.chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens,
                                               page_table, sm_scale=sm_scale)
  return kernels.chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens,
                                           page_table, sm_scale=sm_scale, **_kernel_options())
