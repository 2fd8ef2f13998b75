"""The package's import structure: no import cycle, and every layer imports only downward.

The graph is read from the source with `ast` (nothing is imported), over `disagg_jax` and
`pallas_kernels`. Every import counts: module-level ones, those inside functions (a deferred
import is still a dependency, and a cycle through one is only a matter of call order away from
failing: the old `sim.profile` <-> `sim.simulator` cycle was one) and those under
`if TYPE_CHECKING:` (the code uses none). Importing `a.b.c` from outside package `a.b` also runs
`a.b`'s `__init__`, so that counts as an import of `a.b` too.

The layers, bottom to top (also in README.md, "Layout"); a module may import its own layer and
the layers below it, never one above:

  0  disagg_jax.shapes (the model shapes the lower layers read), pallas_kernels (kernels)
  1  parallel (meshes, sharding rules)
  2  kv (page pool, page arithmetic)
  3  transfer (KV between meshes)
  4  models (configs, the network, loading)
  5  sched (pure scheduling policies)
  6  engine (steps, schedulers, the engines)
  7  bench's data modules: workloads, arrivals, metrics, report, plots
  8  sim (step profiles, simulator, planner, live timing)
  9  bench's drivers (runner, sweep, calibration, the OpenAI client), cluster, serve
  10 cli, prompts, testing

and two tighter rules: `sched` imports nothing of the repository but `kv` (its policies are shared
by the engine and the simulator), and `pallas_kernels` nothing of `disagg_jax`.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("disagg_jax", "pallas_kernels")

LAYERS = (
    ("disagg_jax", "disagg_jax.shapes", "pallas_kernels"),
    ("disagg_jax.parallel",),
    ("disagg_jax.kv",),
    ("disagg_jax.transfer",),
    ("disagg_jax.models",),
    ("disagg_jax.sched",),
    ("disagg_jax.engine",),
    ("disagg_jax.bench.workloads", "disagg_jax.bench.arrivals", "disagg_jax.bench.metrics",
     "disagg_jax.bench.report", "disagg_jax.bench.plots"),
    ("disagg_jax.sim",),
    ("disagg_jax.bench", "disagg_jax.cluster", "disagg_jax.serve"),
    ("disagg_jax.cli", "disagg_jax.prompts", "disagg_jax.testing"),
)
# Package -> the only packages of the repository it may import (besides itself).
ONLY = {
    "disagg_jax.sched": ("disagg_jax.kv",),
    "pallas_kernels": (),
}


def _modules() -> dict[str, str]:
  """Module name -> file, for every .py file of PACKAGES."""
  out = {}
  for package in PACKAGES:
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
      for name in filenames:
        if not name.endswith(".py"):
          continue
        path = os.path.join(dirpath, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[module.removesuffix(".__init__")] = path
  return out


def _within(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def _graph() -> dict[str, list[tuple[str, int]]]:
  """Module -> [(imported module of the repository, line)]."""
  modules = _modules()

  def resolve(name: str) -> str | None:
    """The longest prefix of `name` that is a module of ours."""
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    here = module if is_package else module.rpartition(".")[0]
    edges = set()

    def add(target: str | None, line: int) -> None:
      if target is None or target == module:
        return
      edges.add((target, line))
      # Importing a.b.c runs the __init__ of every package on the way, unless we are inside it.
      parent = target.rpartition(".")[0]
      while parent:
        if parent in modules and not _within(module, parent):
          edges.add((parent, line))
        parent = parent.rpartition(".")[0]

    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] in PACKAGES:
            add(resolve(alias.name), node.lineno)
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = here.split(".")[:len(here.split(".")) - node.level + 1]
          source = ".".join(base + ([node.module] if node.module else []))
        else:
          source = node.module or ""
        if source.split(".")[0] not in PACKAGES:
          continue
        for alias in node.names:
          submodule = f"{source}.{alias.name}"
          add(submodule if submodule in modules else resolve(source), node.lineno)
    graph[module] = sorted(edges)
  return graph


def _layer(module: str) -> int | None:
  """The layer of the longest LAYERS prefix of `module`."""
  best = None
  for rank, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if _within(module, prefix) and (best is None or len(prefix) > len(best[1])):
        best = (rank, prefix)
  return None if best is None else best[0]


def _layers(modules) -> dict[str, int | None]:
  """Module -> layer. A package's `__init__` runs whenever any of its modules is imported, so it
  sits in the lowest layer of its modules (`bench/__init__` with bench's data modules)."""
  out = {m: _layer(m) for m in modules}
  for package in modules:
    inside = [out[m] for m in modules if _within(m, package) and out[m] is not None]
    if inside:
      out[package] = min(inside)
  return out


@pytest.fixture(scope="module")
def graph():
  return _graph()


def test_the_graph_sees_the_imports_it_should(graph):
  """The parser itself: module-level, function-level and package imports are all found."""
  def targets(module):
    return {t for t, _ in graph[module]}
  assert "disagg_jax.engine.engine" in targets("disagg_jax.cluster.driver")
  assert "disagg_jax.cluster.driver" in targets("disagg_jax.cli")  # inside a function
  assert "disagg_jax.parallel" in targets("disagg_jax.kv.layout")  # from disagg_jax import ...
  assert "disagg_jax.sim.profile" in targets("disagg_jax.sim.timing")


def test_no_import_cycle(graph):
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def connect(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w, _ in graph.get(v, ()):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for module in sorted(graph):
    if module not in index:
      connect(module)
  lines = []
  for component in cycles:
    members = set(component)
    lines.append(" <-> ".join(component) + ":")
    lines += [f"    {m} imports {t} (line {n})" for m in component for t, n in graph[m]
              if t in members]
  assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_every_module_has_a_layer(graph):
  unplaced = sorted(m for m, layer in _layers(graph).items() if layer is None)
  assert not unplaced, f"add these to a layer in tests/test_imports.py: {unplaced}"


def test_layers_import_downward_only(graph):
  bad = []
  layers = _layers(graph)
  for module, edges in sorted(graph.items()):
    mine = layers[module]
    only = next((allowed + (package,) for package, allowed in ONLY.items()
                 if _within(module, package)), None)
    for target, line in edges:
      theirs = layers.get(target)
      if mine is not None and theirs is not None and theirs > mine:
        bad.append(f"{module} (layer {mine}) imports {target} (layer {theirs}), line {line}")
      elif only is not None and not any(_within(target, p) for p in only):
        bad.append(f"{module} imports {target}, line {line}: it may import only {only}")
  assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_rules_catch_what_they_should():
  """Spot checks of the rules themselves, on module names."""
  assert _layer("disagg_jax.parallel.mesh") < _layer("disagg_jax.models.config")
  assert _layer("disagg_jax.transfer.plan") < _layer("disagg_jax.models.config")
  assert _layer("disagg_jax.bench.metrics") < _layer("disagg_jax.sim.simulator")
  assert _layer("disagg_jax.bench.runner") > _layer("disagg_jax.sim.simulator")
  assert _layer("disagg_jax.sched.policy") < _layer("disagg_jax.engine.engine")
  assert _layer("disagg_jax.sched.policy") < _layer("disagg_jax.sim.simulator")


def test_model_config_satisfies_the_shared_shapes():
  from disagg_jax.models.config import ModelConfig
  from disagg_jax.shapes import ModelShape
  cfg = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                    max_position_embeddings=128)
  assert isinstance(cfg, ModelShape)
