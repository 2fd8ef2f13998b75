"""Rotary position embeddings, in Hugging Face's rotate-half layout."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from disagg_jax.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """float32[head_dim // 2]: the rotation frequency of each pair of channels."""
  exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
  if rope.rope_type == "linear":
    return (inv_freq / np.float32(rope.factor)).astype(np.float32)
  if rope.rope_type == "llama3":
    return _llama3_scaling(inv_freq, rope)
  return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
  """Llama 3.1's frequency rescaling: long wavelengths slowed by `factor`, short ones kept, and a
  smooth interpolation in between."""
  old_len = rope.original_max_position_embeddings
  low_freq_wavelen = old_len / rope.low_freq_factor
  high_freq_wavelen = old_len / rope.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
  smooth = (old_len / wavelen - rope.low_freq_factor) / (
      rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rotary_tables(positions: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """positions int32[...] -> (cos, sin), each float32[..., head_dim]."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """x: [..., H, D]; cos/sin: [..., D] (broadcast over heads). Computed in float32."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[..., None, :] + rotated * sin[..., None, :]
  return out.astype(x.dtype)
