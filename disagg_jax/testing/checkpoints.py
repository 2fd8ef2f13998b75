"""Random-weight Hugging Face checkpoints of real model shapes, built locally with `transformers`
(nothing is downloaded): the real-size fixtures of the tests and the CPU benchmarks.

    path = checkpoints.random_checkpoint("smollm2_135m")   # cached under ~/.cache/disagg_jax

The tokenizer is a small byte-level BPE (`tiny_hf.write_tokenizer`); its ids are a subset of the
model's vocabulary, so text prompts work, and generated ids beyond it decode to nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from disagg_jax.models import presets
from disagg_jax.models.config import ModelConfig


def cache_root() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "disagg_jax", "checkpoints")


def write_random_checkpoint(cfg: ModelConfig, out_dir: str, *, seed: int = 0,
                            init_std: float = 0.02):
  """Writes config.json, model.safetensors (float32) and tokenizer.json for `cfg` with random
  weights (normal, std `init_std`: transformers' own initializer_range) and returns the
  transformers model (float32, eval mode)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from disagg_jax.testing import tiny_hf  # pylint: disable=g-import-not-at-top
  hf = cfg.to_hf_dict()
  hf.pop("architectures")
  hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), initializer_range=init_std,
                                               **hf)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
  model.eval()
  model.save_pretrained(out_dir)
  tiny_hf.write_tokenizer(out_dir)
  return model


def random_checkpoint(name: str, *, seed: int = 0, cache_dir: str | None = None) -> str:
  """The directory of a random-weight checkpoint of configs/models/NAME.py, built once and kept
  under `cache_dir` (default ~/.cache/disagg_jax/checkpoints)."""
  cfg = presets.model_preset(name)
  out = os.path.join(cache_dir or cache_root(), f"{name}-seed{seed}")
  if os.path.exists(os.path.join(out, "model.safetensors")):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=f".{name}-")
  try:
    write_random_checkpoint(cfg, tmp, seed=seed)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out
