import numpy as np
import pytest

from disagg_jax.models.config import ModelConfig
from disagg_jax.models.rope import inverse_frequencies


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_inverse_frequencies_match_transformers(scaling):
  import transformers
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  params = {"rope_type": "default", "rope_theta": 500000.0, **(scaling or {})}
  hf_config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2,
                                       rope_parameters=params)
  ours = ModelConfig.from_hf_dict(hf_config.to_dict())
  theirs = (ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, "cpu")[0]
            if params["rope_type"] != "default"
            else 1.0 / (500000.0 ** (np.arange(0, 64, 2, dtype=np.float32) / 64)))
  np.testing.assert_allclose(inverse_frequencies(ours.rope, 64), np.asarray(theirs), rtol=1e-6)
  if scaling and scaling["rope_type"] == "llama3":
    plain = inverse_frequencies(ModelConfig.from_hf_dict(
        {**hf_config.to_dict(), "rope_parameters": {"rope_theta": 500000.0}}).rope, 64)
    assert not np.allclose(plain, inverse_frequencies(ours.rope, 64))  # the scaling matters
