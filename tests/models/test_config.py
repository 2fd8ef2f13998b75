import json

import pytest

from disagg_jax.models.config import ConfigError, ModelConfig

BASE = {
    "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "eos_token_id": 2,
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_llama3_rope_read_from_both_layouts():
  legacy = ModelConfig.from_hf_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
  new = ModelConfig.from_hf_dict({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
  assert legacy.rope == new.rope
  assert new.rope.rope_type == "llama3" and new.rope.theta == 500000.0 and new.rope.factor == 8.0


def test_family_specifics():
  qwen2 = ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2", "tie_word_embeddings": True})
  assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
  qwen3 = ModelConfig.from_hf_dict({**BASE, "model_type": "qwen3", "head_dim": 32})
  assert qwen3.qk_norm and qwen3.head_dim == 32 and not qwen3.qkv_bias
  mistral = ModelConfig.from_hf_dict({**BASE, "model_type": "mistral", "head_dim": 24})
  assert mistral.head_dim == 24
  assert ModelConfig.from_hf_dict(BASE).head_dim == 16


def test_generation_config_eos_wins():
  cfg = ModelConfig.from_hf_dict(BASE, {"eos_token_id": [5, 6]})
  assert cfg.eos_token_ids == (5, 6)


def test_round_trip_through_hf_dict():
  cfg = ModelConfig.from_hf_dict({**BASE, "rope_theta": 5e5, "rope_scaling": LLAMA3})
  assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
    ({"vocab_size": None}, "no 'vocab_size'"),
    ({"eos_token_id": 100}, "eos_token_id 100 is outside the vocabulary [0, 100)"),
])
def test_bad_configs_name_the_problem(change, message):
  with pytest.raises(ConfigError) as e:
    ModelConfig.from_hf_dict({**BASE, **change})
  assert message in str(e.value)


def test_missing_and_corrupt_config_json(tmp_path):
  with pytest.raises(ConfigError, match="config.json does not exist"):
    ModelConfig.from_dir(str(tmp_path))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="is not valid JSON"):
    ModelConfig.from_dir(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps([1, 2]))
  with pytest.raises(ConfigError, match="must hold a JSON object"):
    ModelConfig.from_dir(str(tmp_path))
  (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "bert"}))
  with pytest.raises(ConfigError, match=r"config.json: unsupported model_type 'bert'"):
    ModelConfig.from_dir(str(tmp_path))
