"""OPT-66B's shape (facebook/opt-66b config.json: 64 layers, hidden 9216, 72 heads of 128 with
as many KV heads, ffn_dim 36864 with ReLU, vocabulary 50,272, tied embeddings, learned positions
for 2,048 tokens; 65.7B parameters). For the analytic model only, like opt_13b."""

from disagg_jax.models.config import ModelConfig


def get_model_config() -> ModelConfig:
  return ModelConfig(model_type="opt", vocab_size=50272, hidden_size=9216,
                     intermediate_size=36864, num_layers=64, num_heads=72, num_kv_heads=72,
                     head_dim=128, max_position_embeddings=2048, rms_norm_eps=1e-5,
                     qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                     mlp_gated=False, learned_positions=True, bos_token_id=2, eos_token_ids=(2,),
                     pad_token_id=1)
