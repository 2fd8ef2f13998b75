"""The 135M shape (SmolLM2-135M: 30 layers, 9/3 heads, vocabulary 49,152, 8k context) on default
settings: what start-up compiles and how the steps are bucketed. Nothing is compiled here (the
weights are abstract, `Step.precompile` only records); `launch/bench_startup.py` and the slow test
in tests/launch/test_real_scale_runs.py run it for real."""

import jax
import pytest

from disagg_jax import parallel
from disagg_jax.engine import compiled, memory
from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.models import loading, presets


@pytest.fixture
def recorded(monkeypatch):
  """Every shape the engine asks to compile up front: {step name: [shape keys]}."""
  seen = {}

  def record(self, *args):
    seen.setdefault(self.name, []).append(compiled._shape_key(args))  # pylint: disable=protected-access
    return 0.0

  monkeypatch.setattr(compiled.Step, "precompile", record)
  monkeypatch.setattr(memory, "host_total_bytes", lambda: 24 * 10**9)
  monkeypatch.setattr(memory, "host_available_bytes", lambda: 20 * 10**9)
  return seen


def _model(device):
  mesh = parallel.make_mesh([jax.devices()[device]], 1)
  return loading.abstract_on_mesh(presets.model_preset("smollm2_135m"), mesh, "float32")


@pytest.mark.parametrize("mode", ["disagg", "colocated"])
def test_defaults_compile_a_few_short_shapes_up_front(mode, recorded):
  prefill = _model(0)
  decode = _model(1) if mode == "disagg" else None
  with Engine.create(mode, prefill, decode, EngineConfig(), progress=False) as engine:
    assert engine.limits.max_seq_len == 8192
    widths = engine.core.widths  # pages of 16 tokens: 64 tokens up to 8k
    assert widths[0] * 16 == 64 and widths[-1] * 16 == 8192 and len(widths) == 8
    assert engine.core.row_buckets == (8, 32)
    # The pool: a few hundred to a few thousand pages, not 32 slots x 512 pages.
    assert 512 < engine.pool.usable_pages < 32 * 512
  shapes = sum(len(v) for v in recorded.values())
  if mode == "disagg":
    # prefill, into its prefix cache: mixed steps of width 64 tokens x chunk rows 1, 4 x chunk
    # lengths 32, 64, 128, and the gathers of prompts of 16..128 tokens; decode: widths 64, 128
    # tokens x 2 row counts.
    assert len(recorded["mixed"]) == 2 * 3 and len(recorded["gather"]) == 4
    assert "prefill" not in recorded  # no dense prefill step
    # inserts: blocks of 1..8 pages (prompts up to 128 tokens), all 30 layers in one group.
    assert len(recorded["decode"]) == 2 * 2 and len(recorded["insert_block"]) == 4
    assert len(recorded["set_token"]) == 1
    # a slot's penalty history, on each mesh's decode core (the prefill cache has one too)
    assert len(recorded["set_history"]) == 2
    assert shapes == 21
  else:
    # decode as above; mixed: width 64 tokens x chunk rows 1, 4 x chunk lengths 32, 64, 128.
    assert len(recorded["decode"]) == 4 and len(recorded["mixed"]) == 2 * 3
    assert len(recorded["set_history"]) == 1
    assert shapes == 11
  assert all(k[3][1] <= 8 for k in recorded["decode"])  # page tables of at most 128 tokens


def test_precompile_len_minus_one_covers_every_shape(recorded):
  with Engine.create("colocated", _model(0), None, EngineConfig(precompile_len=-1),
                     progress=False) as engine:
    widths = engine.core.widths
  assert len(recorded["decode"]) == len(widths) * 2
  assert len(recorded["mixed"]) == len(engine.scheduler.chunks.widths) * 2 * 3
