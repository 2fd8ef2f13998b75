"""Shared fixtures. Eight simulated CPU devices are configured before JAX's backend starts, so mesh
tests can run anywhere."""

import os

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
  """hf_checkpoint(family, **kwargs) -> (model_dir, transformers model), built once per session."""
  from disagg_jax.testing import tiny_hf
  cache = {}

  def make(family: str, **kwargs):
    key = (family, tuple(sorted(kwargs.items())))
    if key not in cache:
      out_dir = str(tmp_path_factory.mktemp(f"hf_{family}"))
      cache[key] = (out_dir, tiny_hf.write_checkpoint(family, out_dir, **kwargs))
    return cache[key]

  return make


@pytest.fixture(scope="session")
def repo_root():
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
