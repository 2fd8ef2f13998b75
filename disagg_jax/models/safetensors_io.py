"""A lazy safetensors reader: tensors are memory-mapped and only the slices asked for are read.

The `safetensors` package's numpy front end cannot represent bfloat16, the dtype most published
checkpoints use, so the (simple, documented) file format is read directly: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class CheckpointError(ValueError):
  """A checkpoint file or tensor that cannot be used, naming it and what was expected."""


class SafetensorsFile:
  """One `.safetensors` file; `tensor(name)` is a read-only memory map of that tensor."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > os.path.getsize(path) - 8:
          raise CheckpointError(f"{path}: header length {header_len} exceeds the file size")
        self._header = json.loads(f.read(header_len))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
    self._data_start = 8 + header_len
    self._header.pop("__metadata__", None)

  def names(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def tensor(self, name: str) -> np.ndarray:
    if name not in self._header:
      raise CheckpointError(f"{self.path} has no tensor {name}")
    info = self._header[name]
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if end - begin != expected:
      raise CheckpointError(f"{self.path}: tensor {name} holds {end - begin} bytes, its shape "
                            f"{shape} and dtype {info['dtype']} need {expected}")
    if expected == 0:
      return np.zeros(shape, dtype)
    return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin,
                     shape=shape)


class SafetensorsCheckpoint:
  """All tensors of a Hugging Face model directory (`model.safetensors` or a sharded index)."""

  def __init__(self, model_dir: str):
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single_path = os.path.join(model_dir, "model.safetensors")
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid safetensors index: {e}") from None
      for name, filename in weight_map.items():
        self._where[name] = os.path.join(model_dir, filename)
    elif os.path.exists(single_path):
      for name in self._open(single_path).names():
        self._where[name] = single_path
    else:
      raise CheckpointError(f"{model_dir} has neither model.safetensors nor "
                            "model.safetensors.index.json")

  def _open(self, path: str) -> SafetensorsFile:
    if path not in self._files:
      if not os.path.exists(path):
        raise CheckpointError(f"checkpoint shard {path} is missing")
      self._files[path] = SafetensorsFile(path)
    return self._files[path]

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def names(self) -> Iterator[str]:
    return iter(self._where)

  def tensor(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f"tensor {name} is missing from the checkpoint")
    return self._open(self._where[name]).tensor(name)
