"""Sizing the page pool from memory: the budget arithmetic, the failure with numbers, the real
shape's defaults, and the activation estimates against XLA's own memory analysis."""

import dataclasses
import types

import jax
import numpy as np
import pytest

from disagg_jax import parallel
from disagg_jax.engine import buckets, memory
from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.engine.request import Limits
from disagg_jax.engine.sampling import SamplingArrays
from disagg_jax.engine.steps import ModelSteps
from disagg_jax.models import loading, presets
from disagg_jax.testing import helpers

GB = 1e9


def _host(monkeypatch, total, available=None):
  monkeypatch.setattr(memory, "host_total_bytes", lambda: total)
  monkeypatch.setattr(memory, "host_available_bytes", lambda: available or total)


def _abstract(name="smollm2_135m", devices=(0,), tp=1, dtype="float32"):
  mesh = parallel.make_mesh([jax.devices()[i] for i in devices], tp)
  return loading.abstract_on_mesh(presets.model_preset(name), mesh, dtype)


def test_real_shape_defaults_size_the_pool_from_memory(monkeypatch):
  """The 135M shape at 8k context on defaults: a pool of what 5% of a 24 GB host holds, not
  32 slots x 8k tokens (12 GB), with one 8k request fitting; the pool stays shardable."""
  _host(monkeypatch, 24 * 10**9)
  model = _abstract()
  config = EngineConfig()
  limits = Limits.for_model(model.cfg)
  plan = memory.plan_engine_pool(config, limits, "disagg", model, _abstract(devices=(1,)))
  kv_per_token = model.cfg.kv_bytes_per_token(4)
  assert limits.max_seq_len == 8192
  assert plan.pool_bytes + plan.staging_bytes <= 0.05 * 24e9
  assert plan.pool_bytes > 0.5 * 0.05 * 24e9 - plan.activation_bytes * 3  # not far below it
  assert 8192 <= plan.tokens < 32 * 8192
  assert plan.staging_tokens == 8192
  assert plan.page_bytes == 16 * kv_per_token
  lines = plan.describe("decode", model.mesh)
  assert "memory_fraction 0.05" in lines[1] and f"{plan.tokens:,} tokens" in lines[2]


def test_pool_size_is_stable_and_bounded_by_available_memory(monkeypatch):
  """Free memory moves a little between runs; the pool's shape (a compiled argument of every
  step) must not, or the persistent compilation cache would miss."""
  model = _abstract()
  config, limits = EngineConfig(), Limits.for_model(model.cfg)
  sizes = set()
  for available in (20.0e9, 20.3e9, 20.6e9):
    _host(monkeypatch, 24 * 10**9, int(available))
    sizes.add(memory.plan_engine_pool(config, limits, "colocated", model).pages_per_shard)
  assert len(sizes) == 1
  _host(monkeypatch, 24 * 10**9, 3 * 10**9)  # others use most of the machine: less for us
  assert memory.plan_engine_pool(config, limits, "colocated", model).pages_per_shard < min(sizes)
  assert [memory.round_pages(n) for n in (5, 1000, 1379, 65535)] == [5, 896, 1280, 57344]


def test_pool_is_capped_at_every_slot_full_and_num_pages_overrides(monkeypatch):
  _host(monkeypatch, 10**12)
  model = _abstract()
  limits = Limits(max_seq_len=512, max_prefill_length=512)
  plan = memory.plan_engine_pool(EngineConfig(decode_batch=8), limits, "colocated", model)
  assert plan.capped and plan.pages_per_shard == 8 * 32 + 1
  plan = memory.plan_engine_pool(EngineConfig(num_pages=100), limits, "colocated", model)
  assert plan.num_pages == 100 and plan.free_bytes is None


def test_a_pool_that_cannot_hold_one_request_fails_with_the_numbers(monkeypatch):
  _host(monkeypatch, 4 * 10**9)
  model = _abstract()
  with pytest.raises(memory.PoolSizeError) as e:
    memory.plan_engine_pool(EngineConfig(memory_fraction=0.01), Limits.for_model(model.cfg),
                            "colocated", model)
  message = str(e.value)
  assert "fewer than one max_seq_len=8,192 request needs (512 pages)" in message
  assert "--config.engine.memory_fraction" in message and "max_seq_len" in message
  with pytest.raises(memory.PoolSizeError, match="memory_fraction=1.5 must be in"):
    memory.plan_engine_pool(EngineConfig(memory_fraction=1.5), Limits.for_model(model.cfg),
                            "colocated", model)


class _FakeDevice:
  platform = "gpu"

  def __init__(self, limit, used):
    self.stats = {"bytes_limit": limit, "bytes_in_use": used}

  def memory_stats(self):
    return self.stats


def test_accelerators_take_a_share_of_each_devices_free_memory():
  """On a GPU / TPU the pool is 0.9 of the least free device memory after the weights (in use)
  and the activations, less staging, in whole pages."""
  cfg = presets.model_preset("llama3_8b")
  devices = np.array([[_FakeDevice(80 * 10**9, 17 * 10**9), _FakeDevice(80 * 10**9, 16 * 10**9)]])
  mesh = types.SimpleNamespace(devices=devices, shape={"dp": 1, "tp": 2}, size=2)
  weights = [jax.ShapeDtypeStruct((10,), np.float32)]
  plan = memory.plan_pool(cfg, mesh, dtype=np.dtype("bfloat16"), page_size=16, num_slots=256,
                          max_seq_len=8192, weights=weights, activation_bytes=2 * 10**9,
                          staging_tokens=8192)
  page_bytes = 2 * 32 * (8 // 2) * 16 * 128 * 2
  staging = 2 * 32 * 4 * 8192 * 128 * 2
  assert plan.page_bytes == page_bytes and plan.staging_bytes == staging
  exact = int((0.9 * (80e9 - 17e9 - 2e9) - staging) // page_bytes)
  assert plan.pages_per_shard == memory.round_pages(exact) and exact * 0.875 < plan.pages_per_shard
  assert plan.fraction == 0.9 and plan.free_bytes == 80 * 10**9 - 17 * 10**9 - 2 * 10**9
  assert not plan.capped


@pytest.mark.parametrize("mode", [pytest.param("colocated", marks=pytest.mark.slow), "disagg"])
def test_engine_prints_its_budget(mode, hf_checkpoint, capsys):
  model_dir, _ = hf_checkpoint("llama3")
  prefill = loading.load_model(model_dir, helpers.mesh(1, 1, start=0))
  decode = loading.load_model(model_dir, helpers.mesh(2, 1, start=4)) if mode == "disagg" else None
  config = EngineConfig(max_seq_len=128, decode_batch=4, prefill_batch=2, chunk_size=32,
                        chunk_batch=2)
  with Engine.create(mode, prefill, decode, config) as engine:
    err = capsys.readouterr().err
    assert "KV page pool:" in err and "per device" in err
    assert f"{engine.page_capacity:,} pages" in err
    assert "compiled" in err and "step shapes for sequences up to" in err
    if mode == "disagg":
      assert "prefill mesh: 1 cpu device(s)" in err and "dp=2 tp=1" in err
      # decode_prefill_tokens=-1 on CPU: no decode-side prefill, so the decode pool does not
      # cache (docs/PREFIX_CACHING.md)
      assert engine.decode_prefill_tokens == 0 and not engine.core.slots.prefix_caching


def test_activation_estimates_bound_what_xla_allocates(hf_checkpoint):
  """The estimates used for sizing are upper bounds of XLA's temporaries (and outputs) of the
  largest decode, mixed and prefill steps, within a small factor."""
  model_dir, _ = hf_checkpoint("qwen3")
  model = loading.load_model(model_dir, helpers.mesh())
  config = EngineConfig(max_seq_len=256, decode_batch=8, chunk_size=64, chunk_batch=2,
                        prefill_batch=2, max_prefill_tokens=512, attention_impl="xla")
  limits = Limits.for_model(model.cfg, 256)
  steps = ModelSteps(model, page_size=16, attention_impl="xla")
  pool = steps.init_pages(8 * 16 + 1)
  rows = lambda *a: steps.put_rows(*a)
  b, width = 8, 16
  sampling = SamplingArrays.from_params([], b)
  decode = steps.decode.lower(model.params, pool, *rows(np.zeros(b, np.int32),
                                                         np.zeros(b, np.int32),
                                                         np.zeros((b, width), np.int32), sampling,
                                                         np.arange(b, dtype=np.int32)))
  measured = decode.compile().memory_analysis().temp_size_in_bytes
  estimate = memory.paged_step_activations(config, limits, model, decode_rows=b)
  assert measured <= estimate <= 40 * max(measured, 1)
  bc, c = 2, 64
  mixed = steps.mixed.lower(model.params, pool, *rows(
      np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros((b, width), np.int32), sampling,
      np.zeros((bc, c), np.int32), np.zeros(bc, np.int32), np.zeros(bc, np.int32),
      np.zeros(bc, np.int32), np.zeros(bc, bool)))
  measured = mixed.compile().memory_analysis().temp_size_in_bytes
  estimate = memory.paged_step_activations(config, limits, model, decode_rows=b, chunk_rows=bc,
                                           chunk_len=c)
  assert measured <= estimate
  prefill = steps.prefill.lower(model.params, *rows(np.zeros((2, 256), np.int32),
                                                    np.ones(2, np.int32),
                                                    SamplingArrays.from_params([], 2)))
  stats = prefill.compile().memory_analysis()
  estimate = memory.prefill_step_activations(config, limits, model)
  assert stats.temp_size_in_bytes + stats.output_size_in_bytes <= estimate


def test_dataclass_fields_and_config_file_agree(repo_root):
  """Every EngineConfig knob is in configs/engine.py (so it can be set from the command line)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("engine_config",
                                                os.path.join(repo_root, "configs", "engine.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fields = {f.name for f in dataclasses.fields(EngineConfig)} - {"attention_impl"}
  assert fields <= set(module.get_config().engine.keys())


def test_staging_holds_a_full_prefill_step():
  """Auto staging: one full prefill step (prefill_batch prompts of the longest bucket, capped at
  max_prefill_tokens), never below the longest bucket; an explicit size below it is refused."""
  assert buckets.staging_tokens(-1, 2048, 16, 8, 8192) == 8192
  assert buckets.staging_tokens(-1, 512, 16, 4, 8192) == 2048
  assert buckets.staging_tokens(-1, 8192, 16, 4, 8192) == 8192
  assert buckets.staging_tokens(-1, 8192, 16, 4, 4096) == 8192  # one longest prompt at least
  assert buckets.staging_tokens(5000, 2048, 16, 8, 8192) == 5000
  with pytest.raises(ValueError, match=r"staging_tokens=1000 is below .*\(2048 tokens"):
    buckets.staging_tokens(1000, 2048, 16, 8, 8192)
