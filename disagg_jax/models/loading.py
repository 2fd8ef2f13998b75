"""Loading models onto a mesh: Hugging Face safetensors directories and this project's orbax checkpoints.

Every parameter is created directly in its target `NamedSharding` with
`jax.make_array_from_callback`; each device's callback reads only that device's slice from the
memory-mapped checkpoint, so host memory never holds a whole model (or even a whole tensor, for the
sharded ones).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from disagg_jax import parallel
from disagg_jax.models.config import ConfigError, ModelConfig
from disagg_jax.models.llama import Transformer
from disagg_jax.models.safetensors_io import CheckpointError, SafetensorsCheckpoint
from disagg_jax.models.tokenizer import Tokenizer, load_tokenizer

DEMO_MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo_model")
ORBAX_PARAMS = "params"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Params = nnx.State  # the model's parameters as a pytree of (sharded) arrays


@dataclasses.dataclass
class Model:
  """A model placed on a mesh: its config, its structure, its parameters and its tokenizer."""

  cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: Params
  mesh: Mesh
  dtype: Any
  tokenizer: Tokenizer
  path: str | None = None


def abstract_model(cfg: ModelConfig, dtype) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's structure and its parameters as ShapeDtypeStructs, without allocating them."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def _keys(path) -> tuple[str, ...]:
  out = []
  for entry in path:
    key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
    if key != "value":
      out.append(str(key))
  return tuple(out)


def resolve_dtype(dtype) -> Any:
  if isinstance(dtype, str):
    if dtype not in DTYPES:
      raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
  return jnp.dtype(dtype)


# ------------------------------------------------------------------ Hugging Face safetensors

def _hf_name_and_layout(keys: tuple[str, ...], cfg: ModelConfig) -> tuple[str, str]:
  """Our parameter path -> (HF tensor name, how its layout maps to ours)."""
  if keys == ("embedding",):
    return "model.embed_tokens.weight", "copy"
  if keys == ("lm_head",):
    return "lm_head.weight", "transpose"
  if keys == ("final_norm", "scale"):
    return "model.norm.weight", "copy"
  _, layer, *rest = keys
  prefix = f"model.layers.{layer}."
  table = {
      ("input_norm", "scale"): ("input_layernorm.weight", "copy"),
      ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", "copy"),
      ("attn", "wq"): ("self_attn.q_proj.weight", "heads_in"),
      ("attn", "wk"): ("self_attn.k_proj.weight", "heads_in"),
      ("attn", "wv"): ("self_attn.v_proj.weight", "heads_in"),
      ("attn", "wo"): ("self_attn.o_proj.weight", "heads_out"),
      ("attn", "bq"): ("self_attn.q_proj.bias", "heads_bias"),
      ("attn", "bk"): ("self_attn.k_proj.bias", "heads_bias"),
      ("attn", "bv"): ("self_attn.v_proj.bias", "heads_bias"),
      ("attn", "bo"): ("self_attn.o_proj.bias", "copy"),
      ("attn", "q_norm", "scale"): ("self_attn.q_norm.weight", "copy"),
      ("attn", "k_norm", "scale"): ("self_attn.k_norm.weight", "copy"),
      ("mlp", "w_gate"): ("mlp.gate_proj.weight", "transpose"),
      ("mlp", "w_up"): ("mlp.up_proj.weight", "transpose"),
      ("mlp", "w_down"): ("mlp.down_proj.weight", "transpose"),
      ("mlp", "b_gate"): ("mlp.gate_proj.bias", "copy"),
      ("mlp", "b_up"): ("mlp.up_proj.bias", "copy"),
      ("mlp", "b_down"): ("mlp.down_proj.bias", "copy"),
  }
  name, layout = table[tuple(rest)]
  return prefix + name, layout


def _source_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The HF shape that maps onto our `shape` under `layout`."""
  if layout == "copy":
    return shape
  if layout == "transpose":
    return shape[::-1]
  if layout == "heads_in":  # ours [hidden, N, D] <- HF [N*D, hidden]
    return (shape[1] * shape[2], shape[0])
  if layout == "heads_out":  # ours [N, D, hidden] <- HF [hidden, N*D]
    return (shape[2], shape[0] * shape[1])
  if layout == "heads_bias":  # ours [N, D] <- HF [N*D]
    return (shape[0] * shape[1],)
  raise AssertionError(layout)


def _slice_reader(source: np.ndarray, layout: str, shape: tuple[int, ...], dtype
                  ) -> Callable[[tuple[slice, ...]], np.ndarray]:
  """A callback for make_array_from_callback: our index -> that block, read from `source`."""

  def bounds(index, dim):
    start, stop, _ = index[dim].indices(shape[dim])
    return start, stop

  def read(index):
    if layout == "copy":
      block = source[index]
    elif layout == "transpose":
      block = source[index[1], index[0]].T
    elif layout == "heads_in":
      (h0, h1), (n0, n1) = bounds(index, 0), bounds(index, 1)
      d = shape[2]
      block = source[n0 * d:n1 * d, h0:h1].T.reshape(h1 - h0, n1 - n0, d)[:, :, index[2]]
    elif layout == "heads_out":
      (n0, n1), (h0, h1) = bounds(index, 0), bounds(index, 2)
      d = shape[1]
      block = source[h0:h1, n0 * d:n1 * d].T.reshape(n1 - n0, d, h1 - h0)[:, index[1], :]
    else:  # heads_bias
      (n0, n1) = bounds(index, 0)
      d = shape[1]
      block = source[n0 * d:n1 * d].reshape(n1 - n0, d)[:, index[1]]
    return np.asarray(block, dtype=dtype)

  return read


def load_hf_params(model_dir: str, cfg: ModelConfig, mesh: Mesh, dtype
                   ) -> tuple[nnx.GraphDef, Params]:
  """Reads a HF safetensors checkpoint tensor by tensor into `mesh`'s shardings."""
  checkpoint = SafetensorsCheckpoint(model_dir)
  graphdef, abstract = abstract_model(cfg, dtype)
  np_dtype = np.dtype(jnp.dtype(dtype))
  expected_names = set()

  def load(path, leaf):
    keys = _keys(path)
    name, layout = _hf_name_and_layout(keys, cfg)
    if keys == ("lm_head",) and name not in checkpoint:
      raise CheckpointError(
          f"tensor lm_head.weight is missing and tie_word_embeddings is false; expected shape "
          f"{_source_shape(layout, leaf.shape)}")
    expected_names.add(name)
    want = _source_shape(layout, leaf.shape)
    if name not in checkpoint:
      raise CheckpointError(f"tensor {name} is missing from {model_dir}; expected shape {want}")
    source = checkpoint.tensor(name)
    if tuple(source.shape) != want:
      raise CheckpointError(f"tensor {name} has shape {tuple(source.shape)}; the config "
                            f"({model_dir}/config.json) implies {want}")
    sharding = parallel.param_sharding(keys, leaf.shape, mesh)
    return jax.make_array_from_callback(leaf.shape, sharding,
                                        _slice_reader(source, layout, leaf.shape, np_dtype))

  params = jax.tree_util.tree_map_with_path(load, abstract)
  _warn_unused(checkpoint, expected_names)
  return graphdef, params


def _warn_unused(checkpoint: SafetensorsCheckpoint, used: set[str]) -> None:
  # Rotary caches and the like are derived, not loaded; anything else unused is worth a warning.
  unused = [n for n in checkpoint.names() if n not in used and "rotary_emb" not in n]
  if unused:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("%d checkpoint tensors were not used, e.g. %s", len(unused), unused[:3])


# ------------------------------------------------------------------ orbax

def is_orbax_checkpoint(path: str) -> bool:
  return os.path.isdir(os.path.join(path, ORBAX_PARAMS))


def save_orbax(model: Model, out_dir: str) -> None:
  """Writes `config.json`, the tokenizer (if any) and the parameters as an orbax checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(model.cfg.to_hf_dict(), f, indent=2)
  if model.path:
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
      src = os.path.join(model.path, extra)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(out_dir, extra))
  params_dir = os.path.join(out_dir, ORBAX_PARAMS)
  if os.path.exists(params_dir):
    shutil.rmtree(params_dir)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(params_dir, nnx.to_pure_dict(model.params))
  checkpointer.wait_until_finished()


def load_orbax_params(path: str, cfg: ModelConfig, mesh: Mesh, dtype
                      ) -> tuple[nnx.GraphDef, Params]:
  """Restores an orbax checkpoint straight into `mesh`'s shardings, cast to `dtype`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  graphdef, abstract = abstract_model(cfg, dtype)
  target = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=parallel.param_sharding(_keys(p), x.shape, mesh)),
      nnx.to_pure_dict(abstract))
  checkpointer = ocp.StandardCheckpointer()
  try:
    restored = checkpointer.restore(os.path.abspath(os.path.join(path, ORBAX_PARAMS)), target)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise CheckpointError(f"{path}: the orbax checkpoint does not match config.json: {e}") from None
  nnx.replace_by_pure_dict(abstract, restored)
  return graphdef, abstract


# ------------------------------------------------------------------ entry points

def abstract_on_mesh(cfg: ModelConfig, mesh, dtype="bfloat16") -> Model:
  """The model on `mesh` (a Mesh or an AbstractMesh) with its parameters as ShapeDtypeStructs in
  their shardings: nothing is allocated. For lowering or exporting the steps (`jax.export`), also
  for a platform this process does not run."""
  dtype = resolve_dtype(dtype)
  parallel.check_tp(cfg, parallel.tp_size(mesh))
  graphdef, abstract = abstract_model(cfg, dtype)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=parallel.param_sharding(_keys(p), x.shape, mesh)), abstract)
  return Model(cfg, graphdef, params, mesh, dtype, load_tokenizer(None))


def place_on(model: Model, mesh: Mesh) -> Model:
  """`model` re-placed on `mesh`, device to device (`jax.device_put` into each parameter's
  sharding there). With the same tensor parallelism on both meshes every shard boundary matches,
  so no parameter passes through host memory (tests/engine/test_elastic_engine.py checks it)."""
  parallel.check_tp(model.cfg, parallel.tp_size(mesh))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.device_put(x, parallel.param_sharding(_keys(p), x.shape, mesh)),
      model.params)
  return dataclasses.replace(model, params=params, mesh=mesh)


def load_model(model_path: str | None, mesh: Mesh, dtype="float32") -> Model:
  """Loads a HF directory or an orbax checkpoint written by this project onto `mesh`.

  `model_path=None` loads the built-in demo model.
  """
  path = model_path or DEMO_MODEL_DIR
  if not os.path.isdir(path):
    raise ConfigError(f"model path {path} is not a directory")
  dtype = resolve_dtype(dtype)
  cfg = ModelConfig.from_dir(path)
  parallel.check_tp(cfg, parallel.tp_size(mesh))
  if is_orbax_checkpoint(path):
    graphdef, params = load_orbax_params(path, cfg, mesh, dtype)
  else:
    graphdef, params = load_hf_params(path, cfg, mesh, dtype)
  bos = cfg.bos_token_id
  eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
  tokenizer = load_tokenizer(path, bos_id=bos, eos_id=eos)
  return Model(cfg, graphdef, params, mesh, dtype, tokenizer, path=path)
