"""The in-process Engine (and its --elastic form) and the Ray ClusterEngine implement one API, `engine.api.EngineAPI`,
and the static generator the smaller `Generator`: every member, with the protocol's signature.
Checked on the classes (nothing is built), so it runs in a moment."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from disagg_jax.cluster.driver import ClusterEngine
from disagg_jax.engine import api
from disagg_jax.engine.elastic import ElasticEngine
from disagg_jax.engine.engine import Engine
from disagg_jax.engine.single import StaticGenerator


def _members(protocol) -> tuple[set[str], set[str]]:
  """(methods, data attributes) the protocol declares, its bases' included."""
  methods, data = set(), set()
  for klass in protocol.__mro__:
    if klass in (object,) or not getattr(klass, "_is_protocol", False):
      continue
    data |= set(getattr(klass, "__annotations__", {}))
    methods |= {name for name, value in vars(klass).items()
                if callable(value) and (not name.startswith("_") or name in ("__enter__",
                                                                             "__exit__"))}
  return methods, data - methods


def _instance_attributes(cls) -> set[str]:
  """Names `cls` (or a base) assigns as `self.NAME = ...` in its methods, plus its class-level
  names and properties."""
  names = set()
  for klass in cls.__mro__:
    if klass is object or getattr(klass, "_is_protocol", False):
      continue
    names |= set(vars(klass))
    try:
      tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError):
      continue
    for node in ast.walk(tree):
      targets = (node.targets if isinstance(node, ast.Assign) else
                 [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
      for target in targets:
        for leaf in ast.walk(target):
          if (isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name)
              and leaf.value.id == "self"):
            names.add(leaf.attr)
  return names


def _shape(signature: inspect.Signature):
  """What callers rely on: parameter names, kinds and defaults (annotations are not compared:
  they are strings under `from __future__ import annotations`)."""
  return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("cls,protocol", [(Engine, api.EngineAPI),
                                          (ElasticEngine, api.EngineAPI),
                                          (ClusterEngine, api.EngineAPI),
                                          (StaticGenerator, api.Generator)])
def test_implements_every_member_with_the_protocols_signature(cls, protocol):
  methods, data = _members(protocol)
  assert {"add_request", "abort", "stats", "shutdown", "generate"} <= methods or (
      protocol is api.Generator)
  for name in sorted(methods):
    ours = getattr(cls, name, None)
    assert callable(ours), f"{cls.__name__} has no method {name}"
    assert _shape(inspect.signature(ours)) == _shape(
        inspect.signature(getattr(protocol, name))), (
            f"{cls.__name__}.{name}{inspect.signature(ours)} differs from "
            f"{protocol.__name__}.{name}{inspect.signature(getattr(protocol, name))}")
  missing = data - _instance_attributes(cls)
  assert not missing, f"{cls.__name__} never sets {sorted(missing)}"


def test_the_serving_engines_subclass_the_protocol():
  # (issubclass() refuses protocols with data members; the MRO says the same.)
  assert api.EngineAPI in Engine.__mro__ and api.EngineAPI in ClusterEngine.__mro__
  assert api.EngineAPI in ElasticEngine.__mro__
  assert api.EngineAPI not in StaticGenerator.__mro__  # structural: it is a Generator only
  assert not isinstance(object(), Engine) and not isinstance(object(), api.EngineAPI)
  # Both inherit the one `generate` and the context manager instead of copies of their own.
  for cls in (Engine, ElasticEngine, ClusterEngine):
    for name in ("generate", "__enter__", "__exit__"):
      assert getattr(cls, name) is getattr(api.EngineAPI, name), (cls, name)


def test_protocol_members_are_what_the_callers_use():
  methods, data = _members(api.EngineAPI)
  assert methods == {"add_request", "abort", "stats", "health", "shutdown", "generate",
                     "__enter__", "__exit__"}
  assert data == {"mode", "limits", "model_cfg", "num_devices", "error", "tokenizer"}
