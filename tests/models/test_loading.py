"""Checkpoint loading: sharded indexes, sharded placement, orbax round trips, and clear errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from disagg_jax import parallel
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.models import loading
from disagg_jax.models.config import ConfigError
from disagg_jax.models.safetensors_io import CheckpointError, SafetensorsFile
from disagg_jax.testing import helpers, tiny_hf


def _generate(model, prompts, n=12):
  out = helpers.static_generator(model).generate(prompts, SamplingParams(max_new_tokens=n))
  return [o.output_token_ids for o in out]


def test_sharded_index_checkpoint_matches_single_file(hf_checkpoint):
  single_dir, _ = hf_checkpoint("llama3")
  sharded_dir, _ = hf_checkpoint("llama3", max_shard_size="100KB")
  with open(os.path.join(sharded_dir, "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  a = loading.load_model(single_dir, helpers.mesh())
  b = loading.load_model(sharded_dir, helpers.mesh())
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family, tp", [("llama3", 2),
                                        pytest.param("qwen3", 4, marks=pytest.mark.slow),
                                        ("mistral", 4)])
def test_tensor_parallel_load_places_shards_and_keeps_outputs(family, tp, hf_checkpoint):
  model_dir, _ = hf_checkpoint(family)
  prompts = helpers.random_prompts((4, 21, 60), tiny_hf.VOCAB, seed=3)
  one = loading.load_model(model_dir, helpers.mesh())
  sharded = loading.load_model(model_dir, helpers.mesh(tp, tp))
  wq = sharded.params["layers"][0]["attn"]["wq"][...]
  assert wq.sharding.spec == parallel.param_spec(("wq",), wq.shape, sharded.mesh)
  assert wq.addressable_shards[0].data.shape[1] == one.cfg.num_heads // tp
  np.testing.assert_allclose(helpers.last_logits(helpers.static_generator(sharded), prompts),
                             helpers.last_logits(helpers.static_generator(one), prompts),
                             atol=2e-5)
  assert _generate(sharded, prompts) == _generate(one, prompts)


def test_each_device_reads_only_its_slice(hf_checkpoint, monkeypatch):
  """Loading never materialises a whole sharded tensor on the host: each callback returns exactly
  the block its device holds."""
  model_dir, _ = hf_checkpoint("qwen3")
  reads = []
  real_reader = loading._slice_reader

  def recording_reader(source, layout, shape, dtype):
    read = real_reader(source, layout, shape, dtype)
    def wrapped(index):
      block = read(index)
      reads.append((layout, shape, block.shape))
      return block
    return wrapped

  monkeypatch.setattr(loading, "_slice_reader", recording_reader)
  loading.load_model(model_dir, helpers.mesh(4, 4))
  heads = [(shape, block) for layout, shape, block in reads if layout == "heads_in"]
  assert heads and all(block[1] == shape[1] // 4 for shape, block in heads
                       if shape[1] % 4 == 0)
  down = [(shape, block) for layout, shape, block in reads if shape[0] == 160]
  assert down and all(block[0] == 40 for _, block in down)


def test_orbax_round_trip_onto_four_device_mesh(hf_checkpoint, tmp_path):
  model_dir, _ = hf_checkpoint("qwen2")
  original = loading.load_model(model_dir, helpers.mesh())
  out_dir = str(tmp_path / "orbax")
  loading.save_orbax(original, out_dir)
  assert loading.is_orbax_checkpoint(out_dir)
  restored = loading.load_model(out_dir, helpers.mesh(4, 4))
  wq = restored.params["layers"][1]["attn"]["wq"][...]
  assert wq.sharding.mesh.shape["tp"] == 4 and wq.sharding.spec[1] == "tp"
  for x, y in zip(jax.tree.leaves(original.params), jax.tree.leaves(restored.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  prompts = helpers.random_prompts((7, 33), tiny_hf.VOCAB, seed=4)
  assert _generate(restored, prompts) == _generate(original, prompts)


def test_convert_checkpoint_script(hf_checkpoint, tmp_path, repo_root):
  import subprocess
  import sys
  model_dir, _ = hf_checkpoint("mistral")
  out_dir = str(tmp_path / "converted")
  subprocess.run([sys.executable, os.path.join(repo_root, "launch", "convert_checkpoint.py"),
                  f"--model_path={model_dir}", f"--output_dir={out_dir}", "--dtype=bfloat16"],
                 check=True, capture_output=True)
  converted = loading.load_model(out_dir, helpers.mesh())
  assert converted.cfg == loading.load_model(model_dir, helpers.mesh()).cfg
  assert jax.tree.leaves(converted.params)[0].dtype == np.float32  # restored in the asked dtype


def _copy(src, tmp_path):
  dst = str(tmp_path / "ckpt")
  shutil.copytree(src, dst)
  return dst


def test_missing_tensor_names_it(hf_checkpoint, tmp_path):
  import torch
  from safetensors.torch import load_file, save_file
  model_dir = _copy(hf_checkpoint("llama3")[0], tmp_path)
  path = os.path.join(model_dir, "model.safetensors")
  tensors = load_file(path)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, path)
  with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight is missing.*"
                                            r"expected shape \(160, 64\)"):
    loading.load_model(model_dir, helpers.mesh())
  tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
  save_file(tensors, path)
  with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \(100, 64\).*\(160, 64\)"):
    loading.load_model(model_dir, helpers.mesh())


def test_corrupt_files_get_clear_errors(hf_checkpoint, tmp_path):
  model_dir = _copy(hf_checkpoint("qwen2")[0], tmp_path)
  path = os.path.join(model_dir, "model.safetensors")
  with open(path, "r+b") as f:
    f.write(b"\xff" * 8)
  with pytest.raises(CheckpointError, match="header length"):
    SafetensorsFile(path)
  os.remove(path)
  with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
    loading.load_model(model_dir, helpers.mesh())
  with pytest.raises(ConfigError, match="is not a directory"):
    loading.load_model(str(tmp_path / "nope"), helpers.mesh())


def test_unsupported_model_type_and_tp(hf_checkpoint, tmp_path):
  model_dir = _copy(hf_checkpoint("qwen2")[0], tmp_path)
  with pytest.raises(ValueError, match="tp=8 does not divide the model's 4 attention heads"):
    loading.load_model(model_dir, helpers.mesh(8, 8))
  config_path = os.path.join(model_dir, "config.json")
  with open(config_path) as f:
    hf = json.load(f)
  hf["model_type"] = "falcon"
  with open(config_path, "w") as f:
    json.dump(hf, f)
  with pytest.raises(ConfigError, match="unsupported model_type 'falcon'"):
    loading.load_model(model_dir, helpers.mesh())
