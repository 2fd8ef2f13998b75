"""SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json): 30 layers, 9 query / 3 KV heads
of 64, vocabulary 49,152, tied embeddings, 8k context. The real-size model of the tests and CPU
benchmarks (random weights: `python launch/bench_model.py --model_config=smollm2_135m`)."""

from disagg_jax.models.config import ModelConfig, RopeConfig


def get_model_config() -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                     intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                     head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope=RopeConfig(theta=100000.0), tie_word_embeddings=True,
                     bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)
