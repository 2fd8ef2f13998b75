"""Shared fixtures. Eight simulated CPU devices are configured before JAX's backend starts, so mesh
tests can run anywhere."""

import os
import re
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

# One compilation cache for the session: many tests build engines whose steps have the same
# shapes, and XLA then compiles each step once. A fresh directory per session (shared by the
# pytest-xdist workers, which inherit the variable), so no run depends on an earlier one.
_CACHE_VAR = "DISAGG_JAX_TEST_COMPILATION_CACHE"
_OWNS_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
  if _CACHE_VAR not in os.environ:  # the first process of the session (the xdist controller)
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="disagg_jax_test_xla_cache_")
    config.stash[_OWNS_CACHE] = os.environ[_CACHE_VAR]
  from disagg_jax.engine import compiled
  compiled.enable_persistent_cache(os.environ[_CACHE_VAR])


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core, at most four (each holds a few GB: JAX, torch, engines);
  one when the selected tests need an accelerator (a TPU opens in one process at a time, and
  each process would claim most of a GPU's memory)."""
  if re.search(r"(?<!not )\b(gpu|tpu)\b", config.getoption("markexpr") or ""):
    return 1
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(cores or 1, 4))


def pytest_unconfigure(config):
  path = config.stash.get(_OWNS_CACHE, None)
  if path:
    shutil.rmtree(path, ignore_errors=True)
    del os.environ[_CACHE_VAR]


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
