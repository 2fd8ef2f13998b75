"""Published model shapes by name: the modules of configs/models (e.g. llama3_8b, smollm2_135m).

Used to plan and simulate without a checkpoint, and to build random-weight checkpoints of a real
shape for benchmarks and tests (`disagg_jax.testing.checkpoints`). opt_13b and opt_66b
(`model_type="opt"`: MHA, a plain ReLU MLP, learned positions) exist for the analytic model only
(DistServe's experiments); the engine's network does not run them.
"""

from __future__ import annotations

import importlib.util
import os

from disagg_jax.models.config import ModelConfig

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "models")


def names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(PRESETS_DIR) if f.endswith(".py"))


def model_preset(name: str) -> ModelConfig:
  """The ModelConfig of configs/models/NAME.py."""
  if name not in names():
    raise ValueError(f"--model_config={name!r} is not one of {', '.join(names())} "
                     f"(configs/models)")
  spec = importlib.util.spec_from_file_location(f"model_preset_{name}",
                                                os.path.join(PRESETS_DIR, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_model_config()
