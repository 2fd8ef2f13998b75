"""KV transfer in the disaggregated engine: exactly the pages a prompt fills, layer group by layer
group (`--config.engine.transfer=layers:N`), several pieces in flight; greedy tokens unchanged."""

import dataclasses

import pytest

from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.kv.pages import pages_for
from disagg_jax.testing import helpers, tiny_hf
from disagg_jax.transfer import pieces
from test_engine import CONFIG, assert_all_pages_free, make_engine, reference_outputs

LENGTHS = (1, 16, 17, 40, 70, 3, 33, 100)


@pytest.fixture(scope="module")
def five_layers(hf_checkpoint):
  model_dir, _ = hf_checkpoint("llama3", num_layers=5)
  prompts = helpers.random_prompts(LENGTHS, tiny_hf.VOCAB, seed=23)
  sampling = SamplingParams(max_new_tokens=10)
  return model_dir, prompts, sampling, reference_outputs(model_dir, prompts, sampling)


@pytest.mark.parametrize("transfer, prefill_tp, decode_tp, in_flight", [
    pytest.param("request", 1, 1, 4, marks=pytest.mark.slow),  # every other engine test
    pytest.param("layers:1", 1, 1, 1, marks=pytest.mark.slow),
    ("layers:2", 2, 1, 4),
    ("layers:3", 2, 2, 8),
])
def test_every_transfer_setting_moves_exactly_the_prompt_pages(transfer, prefill_tp, decode_tp,
                                                               in_flight, five_layers):
  model_dir, prompts, sampling, expected = five_layers
  # Shapes compile on first use: only those these prompts need.
  config = dataclasses.replace(CONFIG, transfer=transfer, transfers_in_flight=in_flight,
                               precompile_len=0)
  with make_engine(model_dir, "disagg", prefill_tp, decode_tp, config=config) as engine:
    outputs = engine.generate(prompts, sampling)
    assert [o.output_token_ids for o in outputs] == expected
    assert engine.recompiled() == {}
    assert_all_pages_free(engine)
    cfg, ps = engine.model_cfg, config.page_size
  groups = pieces.layer_groups(cfg.num_layers, pieces.parse_transfer(transfer, cfg.num_layers))
  page_bytes = ps * cfg.num_kv_heads * cfg.head_dim * 4  # float32, K or V of one layer
  for prompt, output in zip(prompts, outputs):
    m = output.metrics
    num_pages = pages_for(len(prompt), ps)
    # The bytes moved: the prompt's pages, every layer, K and V, nothing of the length bucket.
    assert m.transfer_bytes() == num_pages * cfg.num_layers * 2 * page_bytes
    for g, (start, stop) in enumerate(groups):
      mine = [p for p in m.transfer_timeline if p["group"] == g]
      assert all(p["layers"] == [start, stop] for p in mine)
      assert sorted((p["first_page"], p["pages"]) for p in mine) == sorted(
          pieces.page_blocks(num_pages))
    for p in m.transfer_timeline:
      assert p["computed"] <= p["start"] <= p["landed"] <= m.transfer_end
      assert p["host_s"] >= 0
    assert m.phases()["transfer"] >= 0 and m.transfer_total() >= 0


def test_a_bad_transfer_setting_is_one_clear_error(hf_checkpoint):
  model_dir, _ = hf_checkpoint("llama3")
  config = dataclasses.replace(CONFIG, transfer="layers:0")
  with pytest.raises(ValueError, match=r"--config.engine.transfer='layers:0'"):
    make_engine(model_dir, "disagg", config=config)
