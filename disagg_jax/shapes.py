"""The model shapes that the layers below `models/` read.

`parallel/` (sharding rules), `kv/` (the page pool's layout) and `transfer/` (moving KV between
meshes) need a few of a model's dimensions but nothing else of it; they take any object with
these attributes instead of importing `models/`. `disagg_jax.models.config.ModelConfig` is one
(tests check that it satisfies this protocol).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ModelShape(Protocol):
  """The dimensions of a decoder that sharding, the KV pool and KV transfers depend on."""

  @property
  def num_layers(self) -> int: ...

  @property
  def num_heads(self) -> int: ...  # query heads

  @property
  def num_kv_heads(self) -> int: ...

  @property
  def head_dim(self) -> int: ...

  @property
  def intermediate_size(self) -> int: ...  # the MLP's hidden width (sharded over tp)
