"""The one attention dispatch point: `impl` picks the Pallas kernel or the pure-JAX reference.

`auto` means Pallas on TPU and GPU and the XLA reference on CPU (where Pallas only interprets).
Under tensor parallelism a Pallas kernel cannot be partitioned by XLA, so it runs per shard inside
`shard_map`, each device on its own KV heads (and their query heads).
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels import kernels, reference

IMPLS = ("auto", "xla", "pallas")
TP_AXIS = "tp"


def resolve_impl(impl: str, platform: str | None = None) -> str:
  """'auto' | 'xla' | 'pallas' -> 'xla' | 'pallas' for `platform` (default: JAX's backend)."""
  if impl not in IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(IMPLS)}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  return "pallas" if platform in ("tpu", "gpu", "cuda", "rocm") else "xla"


def _interpret() -> bool:
  """Pallas interprets on CPU; real backends compile the kernel."""
  return jax.default_backend() == "cpu"


def _per_head_shards(fn, mesh, num_kv_heads: int, specs, out_spec):
  """`fn` under shard_map over the tp axis when KV heads divide evenly; else `fn` unchanged
  (XLA then gathers the heads around the kernel, which is correct but slower)."""
  if mesh is None or TP_AXIS not in mesh.shape or mesh.shape[TP_AXIS] == 1:
    return fn
  if num_kv_heads % mesh.shape[TP_AXIS]:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)


def prefill(q, k, v, lengths, *, impl: str, causal: bool = True, sm_scale=None, mesh=None):
  """q: [B, S, Hq, D], k/v: [B, S, Hkv, D], lengths: int32[B] -> [B, S, Hq, D]."""
  if resolve_impl(impl) == "xla":
    return reference.prefill_attention(q, k, v, lengths, causal=causal, sm_scale=sm_scale)
  fn = functools.partial(kernels.prefill_attention, causal=causal, sm_scale=sm_scale,
                         interpret=_interpret())
  heads = P(None, None, TP_AXIS, None)
  return _per_head_shards(fn, mesh, k.shape[2], (heads, heads, heads, P()), heads)(
      q, k, v, lengths)


def paged_decode(q, k_pages, v_pages, lengths, page_table, *, impl: str, sm_scale=None,
                 mesh=None):
  """q: [B, Hq, D], pages: [Hkv, P, page_size, D] -> [B, Hq, D]."""
  if resolve_impl(impl) == "xla":
    return reference.paged_decode_attention(q, k_pages, v_pages, lengths, page_table,
                                            sm_scale=sm_scale)
  fn = functools.partial(kernels.paged_decode_attention, sm_scale=sm_scale,
                         interpret=_interpret())
  q_heads, pages = P(None, TP_AXIS, None), P(TP_AXIS)
  return _per_head_shards(fn, mesh, k_pages.shape[0], (q_heads, pages, pages, P(), P()),
                          q_heads)(q, k_pages, v_pages, lengths, page_table)


def chunked_prefill(q, k_pages, v_pages, context_lens, chunk_lens, page_table, *, impl: str,
                    sm_scale=None, mesh=None):
  """q: [B, C, Hq, D] against cached pages plus itself, causally -> [B, C, Hq, D]."""
  if resolve_impl(impl) == "xla":
    return reference.chunked_prefill_attention(q, k_pages, v_pages, context_lens, chunk_lens,
                                               page_table, sm_scale=sm_scale)
  fn = functools.partial(kernels.chunked_prefill_attention, sm_scale=sm_scale,
                         interpret=_interpret())
  q_heads, pages = P(None, None, TP_AXIS, None), P(TP_AXIS)
  return _per_head_shards(fn, mesh, k_pages.shape[0], (q_heads, pages, pages, P(), P(), P()),
                          q_heads)(q, k_pages, v_pages, context_lens, chunk_lens, page_table)
