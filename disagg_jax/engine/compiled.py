"""Compiling the engine's steps: which shapes compile when, and JAX's persistent compilation cache.

Each jitted step function is wrapped in a `Step`, which knows the shapes it has been compiled for.
The engine compiles the shapes most requests need at start-up (`Step.precompile`: lowered and
compiled, never run, so a large shape costs no memory) and every other shape on first use
(`Step.__call__`), with a log line saying what it compiled and how long it took. A shape compiled
twice is a bug (`Step.unexpected_compiles`: JAX's jit cache holds more entries than shapes seen).

`enable_persistent_cache` turns on JAX's on-disk cache, so a second run of the same command loads
its executables instead of compiling them.
"""

from __future__ import annotations

import os
import threading
import time

import jax
import numpy as np
from absl import logging

CACHE_SUBDIR = os.path.join("disagg_jax", "jax_compilation_cache")


def default_cache_dir() -> str:
  """$XDG_CACHE_HOME/disagg_jax/jax_compilation_cache, else ~/.cache/disagg_jax/..."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, CACHE_SUBDIR)


def enable_persistent_cache(path: str | None) -> str | None:
  """Caches every compiled executable under `path` ("" or None: the default directory; "none":
  off). Must run before the first compilation. Returns the directory in use, or None."""
  if path is not None and path.lower() == "none":
    return None
  path = os.path.abspath(os.path.expanduser(path or default_cache_dir()))
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  # The engine's steps compile in about a second each on CPU: cache them all.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


class CacheStats:
  """Counts JAX's persistent-cache hits and misses (process-wide, from jax.monitoring events)."""

  _lock = threading.Lock()
  hits = 0
  misses = 0
  _registered = False

  @classmethod
  def install(cls) -> None:
    with cls._lock:
      if cls._registered:
        return
      cls._registered = True

    def listener(event: str, **kwargs):
      del kwargs
      if event == "/jax/compilation_cache/cache_hits":
        cls.hits += 1
      elif event == "/jax/compilation_cache/cache_misses":
        cls.misses += 1

    jax.monitoring.register_event_listener(listener)

  @classmethod
  def snapshot(cls) -> tuple[int, int]:
    return cls.hits, cls.misses


_ARRAYS = (np.ndarray, np.generic, jax.Array, jax.ShapeDtypeStruct)


def _shape_key(args) -> tuple:
  """The shapes of a call's array arguments; for a list or tuple (a prompt's KV, sampling
  settings) its length and the shape of its first array (a layer group's KV is a list as long
  as the group). Other pytrees (params) have fixed shapes: skipped."""
  key = []
  for a in args:
    length = len(a) if isinstance(a, list) else None
    while isinstance(a, (list, tuple)) and a:
      a = a[0]
    if isinstance(a, _ARRAYS):
      key.append(a.shape if length is None else (length, a.shape))
  return tuple(key)


class Step:
  """A jitted step function and the shapes it has been compiled for."""

  def __init__(self, name: str, jitted):
    self.name = name
    self.jitted = jitted
    self.shapes: set[tuple] = set()
    self.seconds = 0.0  # spent compiling
    self._lock = threading.Lock()

  def precompile(self, *args) -> float:
    """Lowers and compiles for these arguments (arrays or ShapeDtypeStructs) without running;
    returns the seconds it took (0 if that shape was compiled already)."""
    key = _shape_key(args)
    if key in self.shapes:
      return 0.0
    start = time.perf_counter()
    self.jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    with self._lock:
      self.shapes.add(key)
      self.seconds += seconds
    return seconds

  def __call__(self, *args):
    key = _shape_key(args)
    if key in self.shapes:
      return self.jitted(*args)
    start = time.perf_counter()
    out = self.jitted(*args)  # dispatch compiles first, synchronously
    seconds = time.perf_counter() - start
    with self._lock:
      self.shapes.add(key)
      self.seconds += seconds
    logging.warning("compiled %s for shapes %s on first use in %.1f s", self.name, key, seconds)
    return out

  def lower(self, *args):
    return self.jitted.lower(*args)

  def unexpected_compiles(self) -> int:
    """Compilations beyond one per shape seen (0 when every shape compiled once)."""
    return max(0, self.jitted._cache_size() - len(self.shapes))  # pylint: disable=protected-access
