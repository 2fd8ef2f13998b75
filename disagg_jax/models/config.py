"""Model configuration: one frozen dataclass for every supported Llama-family architecture.

Built from a Hugging Face `config.json` (and `generation_config.json` for stop tokens). Every value
the network or the engine needs is explicit here, so nothing downstream reads raw HF dicts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
  """A model directory or config that cannot be used, with what was expected."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary embedding parameters.

  rope_type "default" uses `theta` only; "linear" divides positions by `factor`; "llama3" rescales
  low frequencies as Llama 3.1 does (factor, low/high_freq_factor, original_max_position_embeddings).
  """

  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only Llama-family transformer.

  Covers Llama 2/3/3.x, Mistral (explicit head_dim), Qwen2/2.5 (q/k/v bias, tied embeddings) and
  Qwen3 (q/k RMSNorm). Attention is grouped-query: num_heads is a multiple of num_kv_heads.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int | None = None
  # Shapes the analytic model (disagg_jax/sim/analytic.py) plans for but the network does not run
  # (OPT, configs/models/opt_*.py): a plain two-matrix MLP (fc1 -> ReLU -> fc2) instead of the
  # gated three-matrix SwiGLU, and a learned position table of max_position_embeddings rows.
  mlp_gated: bool = True
  learned_positions: bool = False

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")
    for token_id in self.eos_token_ids:
      if not 0 <= token_id < self.vocab_size:
        raise ConfigError(f"eos_token_id {token_id} is outside the vocabulary [0, {self.vocab_size})")

  @property
  def q_per_kv(self) -> int:
    return self.num_heads // self.num_kv_heads

  def num_params(self) -> int:
    h, d = self.hidden_size, self.head_dim
    attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
    mlp = (3 if self.mlp_gated else 2) * h * self.intermediate_size
    embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
    positions = self.max_position_embeddings * h if self.learned_positions else 0
    return self.num_layers * (attn + mlp + 2 * h) + embed + positions + h

  def kv_bytes_per_token(self, dtype_bytes: int) -> int:
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

  # ---------------------------------------------------------------- Hugging Face conversion

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any],
                   generation_config: Mapping[str, Any] | None = None) -> "ModelConfig":
    """Builds a config from the dict of a Hugging Face `config.json`."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ConfigError(
          f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ConfigError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")

    def required(key):
      if key not in hf or hf[key] is None:
        raise ConfigError(f"config.json has no {key!r}, which a {model_type} model needs")
      return hf[key]

    hidden = required("hidden_size")
    num_heads = required("num_attention_heads")
    head_dim = hf.get("head_dim") or hidden // num_heads
    qkv_bias = bool(hf.get("attention_bias", model_type == "qwen2"))
    # Qwen2's q/k/v projections carry a bias and o_proj none; Llama's attention_bias covers all four.
    o_bias = bool(hf.get("attention_bias", False)) and model_type == "llama"
    sliding = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
      sliding = None
    if model_type == "qwen3" and not hf.get("use_sliding_window", False):
      sliding = None

    eos = _token_ids((generation_config or {}).get("eos_token_id", hf.get("eos_token_id")))
    return cls(
        model_type=model_type,
        vocab_size=required("vocab_size"),
        hidden_size=hidden,
        intermediate_size=required("intermediate_size"),
        num_layers=required("num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(hf),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos,
        pad_token_id=hf.get("pad_token_id"),
    )

  @classmethod
  def from_dir(cls, path: str) -> "ModelConfig":
    """Reads `config.json` (and `generation_config.json` when present) from a model directory."""
    config_path = os.path.join(path, "config.json")
    hf = _read_json(config_path)
    gen_path = os.path.join(path, "generation_config.json")
    generation = _read_json(gen_path) if os.path.exists(gen_path) else None
    try:
      return cls.from_hf_dict(hf, generation)
    except ConfigError as e:
      raise ConfigError(f"{config_path}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """The inverse of `from_hf_dict`, in the `rope_theta` + `rope_scaling` layout."""
    hf = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "hidden_act": "silu",
        "rope_theta": self.rope.theta,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                        else self.eos_token_ids[0],
        "pad_token_id": self.pad_token_id,
    }
    if self.model_type == "llama":
      hf["attention_bias"] = self.qkv_bias
      hf["mlp_bias"] = self.mlp_bias
    if self.rope.rope_type != "default":
      hf["rope_scaling"] = {"rope_type": self.rope.rope_type, "factor": self.rope.factor}
      if self.rope.rope_type == "llama3":
        hf["rope_scaling"].update(
            low_freq_factor=self.rope.low_freq_factor,
            high_freq_factor=self.rope.high_freq_factor,
            original_max_position_embeddings=self.rope.original_max_position_embeddings)
    return hf


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise ConfigError(f"{path} does not exist; a model directory needs a Hugging Face config.json")
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
  return data


def _token_ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  if isinstance(value, int):
    return (value,)
  return tuple(int(v) for v in value)


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
  """Reads RoPE parameters from either HF layout.

  Published checkpoints use `rope_theta` plus an optional `rope_scaling` dict; transformers >= 5
  writes a single `rope_parameters` dict holding `rope_theta` and the scaling keys.
  """
  params = hf.get("rope_parameters")
  if isinstance(params, Mapping) and "rope_theta" not in params and params:
    # Per-layer-type parameters (e.g. {"full_attention": {...}}) are not used by these families.
    raise ConfigError(f"unsupported per-layer rope_parameters {dict(params)!r}")
  scaling = dict(params) if params else dict(hf.get("rope_scaling") or {})
  theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ConfigError(
        f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
  if rope_type == "default":
    return RopeConfig(theta=theta)
  factor = float(scaling.get("factor", 1.0))
  if not math.isfinite(factor) or factor <= 0:
    raise ConfigError(f"rope factor must be positive, got {factor!r}")
  if rope_type == "linear":
    return RopeConfig(theta=theta, rope_type="linear", factor=factor)
  return RopeConfig(
      theta=theta,
      rope_type="llama3",
      factor=factor,
      low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
      high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(
          scaling.get("original_max_position_embeddings",
                      hf.get("max_position_embeddings", 8192))),
  )
