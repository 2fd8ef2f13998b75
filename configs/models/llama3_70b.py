"""Llama-3-70B (meta-llama/Meta-Llama-3-70B config.json)."""

from disagg_jax.models.config import ModelConfig, RopeConfig


def get_model_config() -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=8192,
                     intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
                     head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope=RopeConfig(theta=500000.0))
