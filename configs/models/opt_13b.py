"""OPT-13B's shape (facebook/opt-13b config.json: 40 layers, hidden 5120, 40 heads of 128 with
as many KV heads, ffn_dim 20480 with ReLU, vocabulary 50,272, tied embeddings, learned positions
for 2,048 tokens; 12.85B parameters). For the analytic model only (DistServe's chatbot
experiment, docs/BENCHMARKS.md): the engine's network is Llama-family and does not load OPT
checkpoints. The biases and LayerNorm shifts OPT has (about 0.01% of the weights) are left out."""

from disagg_jax.models.config import ModelConfig


def get_model_config() -> ModelConfig:
  return ModelConfig(model_type="opt", vocab_size=50272, hidden_size=5120,
                     intermediate_size=20480, num_layers=40, num_heads=40, num_kv_heads=40,
                     head_dim=128, max_position_embeddings=2048, rms_norm_eps=1e-5,
                     qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True,
                     mlp_gated=False, learned_positions=True, bos_token_id=2, eos_token_ids=(2,),
                     pad_token_id=1)
