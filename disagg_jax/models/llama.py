"""The Llama-family decoder in Flax NNX.

The network knows nothing about caches or pages: each attention layer projects q/k/v, applies RoPE
and hands them to an `Attention` callable supplied by the step function (prefill, decode, chunked
prefill), which writes the cache and computes attention. The module is split once with `nnx.split`;
step functions merge it inside `jit`, so no Python traverses it per step.

Parameter shapes keep the head axis explicit so tensor parallelism shards it directly:
  wq [hidden, Hq, D], wk/wv [hidden, Hkv, D], wo [Hq, D, hidden],
  w_gate/w_up [hidden, I], w_down [I, hidden], embedding [V, hidden], lm_head [hidden, V].
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from disagg_jax.models import rope as rope_lib
from disagg_jax.models.config import ModelConfig

LayerCache = Any  # whatever the attention callable keeps per layer (dense k/v, pages, ...)


class Attention(Protocol):
  """The attention dispatch seen by the model.

  q: [..., Hq, D], k/v: [..., Hkv, D] (rotary already applied) -> (out [..., Hq, D], new cache).
  """

  def __call__(self, layer: int, q: jax.Array, k: jax.Array, v: jax.Array,
               layer_cache: LayerCache) -> tuple[jax.Array, LayerCache]:
    ...


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
  return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _project(x, w):
  """x [..., hidden] @ w [hidden, N, D] -> [..., N, D], as one plain matmul: flattening the head
  axes of a row-major weight is free, where an einsum over them made XLA:CPU copy the weight into
  another layout at every step."""
  h, n, d = w.shape
  return (x @ w.reshape(h, n * d)).reshape(*x.shape[:-1], n, d)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Cast before scaling, as the reference implementation does, so bfloat16 rounds identically.
    return self.scale[...] * normed.astype(x.dtype)


class SelfAttention(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    h, d = cfg.hidden_size, cfg.head_dim
    self.wq = nnx.Param(_normal(rngs, (h, cfg.num_heads, d), dtype))
    self.wk = nnx.Param(_normal(rngs, (h, cfg.num_kv_heads, d), dtype))
    self.wv = nnx.Param(_normal(rngs, (h, cfg.num_kv_heads, d), dtype))
    self.wo = nnx.Param(_normal(rngs, (cfg.num_heads, d, h), dtype))
    if cfg.qkv_bias:
      self.bq = nnx.Param(jnp.zeros((cfg.num_heads, d), dtype))
      self.bk = nnx.Param(jnp.zeros((cfg.num_kv_heads, d), dtype))
      self.bv = nnx.Param(jnp.zeros((cfg.num_kv_heads, d), dtype))
    if cfg.o_bias:
      self.bo = nnx.Param(jnp.zeros((h,), dtype))
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
      self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
    self.cfg = cfg

  def __call__(self, x, cos, sin, layer: int, attention: Attention, layer_cache):
    q, k, v = (_project(x, w[...]) for w in (self.wq, self.wk, self.wv))
    if self.cfg.qkv_bias:
      q, k, v = q + self.bq[...], k + self.bk[...], v + self.bv[...]
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q = rope_lib.apply_rotary(q, cos, sin)
    k = rope_lib.apply_rotary(k, cos, sin)
    out, layer_cache = attention(layer, q, k, v, layer_cache)
    wo = self.wo[...]
    out = out.astype(x.dtype).reshape(*out.shape[:-2], -1) @ wo.reshape(-1, wo.shape[-1])
    if self.cfg.o_bias:
      out = out + self.bo[...]
    return out, layer_cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    h, i = cfg.hidden_size, cfg.intermediate_size
    self.w_gate = nnx.Param(_normal(rngs, (h, i), dtype))
    self.w_up = nnx.Param(_normal(rngs, (h, i), dtype))
    self.w_down = nnx.Param(_normal(rngs, (i, h), dtype))
    if cfg.mlp_bias:
      self.b_gate = nnx.Param(jnp.zeros((i,), dtype))
      self.b_up = nnx.Param(jnp.zeros((i,), dtype))
      self.b_down = nnx.Param(jnp.zeros((h,), dtype))
    self.use_bias = cfg.mlp_bias

  def __call__(self, x):
    gate = x @ self.w_gate[...]
    up = x @ self.w_up[...]
    if self.use_bias:
      gate, up = gate + self.b_gate[...], up + self.b_up[...]
    out = (jax.nn.silu(gate) * up) @ self.w_down[...]
    return out + self.b_down[...] if self.use_bias else out


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.attn = SelfAttention(cfg, dtype, rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    self.mlp = MLP(cfg, dtype, rngs)

  def __call__(self, x, cos, sin, layer, attention, layer_cache):
    attn_out, layer_cache = self.attn(self.input_norm(x), cos, sin, layer, attention, layer_cache)
    x = x + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return x, layer_cache


class Transformer(nnx.Module):
  """Decoder-only transformer. `dtype` is both the parameter and the activation dtype."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.cfg = cfg
    self.dtype = jnp.dtype(dtype)
    self.embedding = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))
    self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = nnx.Param(_normal(rngs, (cfg.hidden_size, cfg.vocab_size), dtype))
    self.inv_freq = tuple(rope_lib.inverse_frequencies(cfg.rope, cfg.head_dim).tolist())

  def __call__(self, tokens: jax.Array, positions: jax.Array, attention: Attention,
               kv_cache: Sequence[LayerCache] | None = None
               ) -> tuple[jax.Array, list[LayerCache]]:
    """tokens, positions: int32[...] -> (final hidden states [..., hidden], new per-layer caches).

    The layers are a Python loop, unrolled under jit, each with its own cache buffers: carrying the
    cache through `lax.scan` costs several times the step time (see DESIGN.md's anchors).
    """
    x = self.embed(tokens)
    x, new_cache = self.run_layers(x, positions, attention, 0, len(self.layers), kv_cache)
    return self.final_norm(x), new_cache

  def embed(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0)

  def run_layers(self, x: jax.Array, positions: jax.Array, attention: Attention, start: int,
                 stop: int, kv_cache: Sequence[LayerCache] | None = None
                 ) -> tuple[jax.Array, list[LayerCache]]:
    """Layers [start, stop) over hidden states x (a prefill can run its layers in groups);
    kv_cache holds those layers' caches."""
    inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
    cos, sin = rope_lib.rotary_tables(positions, inv_freq)
    kv_cache = kv_cache if kv_cache is not None else [None] * (stop - start)
    new_cache = []
    for i in range(start, stop):
      x, layer_cache = self.layers[i](x, cos, sin, i, attention, kv_cache[i - start])
      new_cache.append(layer_cache)
    return x, new_cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., hidden] -> float32 logits [..., V]."""
    if self.cfg.tie_word_embeddings:
      out = jnp.einsum("...h,vh->...v", hidden, self.embedding[...])
    else:
      out = hidden @ self.lm_head[...]
    return out.astype(jnp.float32)
