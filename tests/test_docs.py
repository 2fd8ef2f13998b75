"""The README's and the tutorial's code blocks run as written, and every link in the docs resolves.

Every ```bash and ```python block of README.md and docs/TUTORIAL.md is one test (ids
`README-L<line>`, `TUTORIAL-L<line>`: the block's first line in the file). A block runs in a
temporary working directory per document, holding links to the checkout's `launch/` and
`configs/`, so `python launch/...` works as from the repository root and every output file stays
out of the checkout; `python` is this interpreter (the virtual environment). A bash block runs
with `set -eo pipefail`; a python block is written to a file and run. It must exit 0.

The blocks of a document run in order and share its working directory, so a block can read
what an earlier one wrote (`simulate.py --profile=col.json` after `profile.py
--output=col.json`). Before a block runs, every earlier block of its document that it may depend
on runs once: the earlier default blocks, and for a slow block the earlier slow ones too (a
default test never waits for a slow one).

What is changed or left out, each with its reason, is in the tables below; every entry must
still match its document (`test_tables_match_the_docs`), so the tables cannot go stale:

- README_INSTALL: the README's quick-start lines create a virtual environment and install the
  package (`python3 -m venv .venv && . .venv/bin/activate && pip install ... && COMMAND`). The
  installation is what this suite already runs in, so only COMMAND runs, and a COMMAND that is the
  test suite itself is dropped.
- SUBSTITUTIONS: (document, text, replacement, why): smaller sizes for blocks that would take
  minutes at the sizes a user runs.
- SKIPPED: (document, text that identifies the block, why): blocks that need what a CPU-only CI
  machine does not have (a real checkpoint, the suite itself).
- SLOW: (document, text, why): blocks behind `@pytest.mark.slow` (`python -m pytest -m slow
  tests/test_docs.py`).
- The server: a block that starts `launch/serve.py` is started once per document (module
  fixture), on a free port instead of the documented 8000, waited for until it listens, and
  stopped with SIGINT after the last test; the blocks that talk to `127.0.0.1:8000` run against
  it with the same port substitution.

The default tests take about 40 s on a 2-core machine (five blocks of ~9 s each, measured in a
full run of the suite) once JAX's persistent compilation cache holds the documents' engine
configurations (the cache the scripts use, under ~/.cache/disagg_jax); from an empty cache they
compile them too. The slow ones take about 15 minutes more (`-m slow`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ("README.md", "docs/TUTORIAL.md")
LINKED_DIRS = ("launch", "configs")  # made visible in each working directory
DOCUMENTED_PORT = 8000

README_INSTALL = re.compile(r"^python3 -m venv .*\bpip install\b.*?&& (?P<command>python .*)$")
DROPPED_COMMANDS = {
    "python -m pytest -q": "the default test suite itself, which this file is part of",
}

SUBSTITUTIONS = [
    # README, "Simulation and planning": profiles at the default sizes (a 1024-token context,
    # 32 decode slots, 5 timed calls per shape) take 3 and 6 minutes on two cores; 512 tokens
    # still fit the prefill_heavy workload simulated after them.
    ("README.md", "--devices=4 --output=col.json",
     "--devices=4 --output=col.json --config.engine.max_seq_len=512 "
     "--config.engine.decode_batch=8 --iters=2", "smaller colocated profile"),
    ("README.md", "--decode_devices=2 --output=dis.json",
     "--decode_devices=2 --output=dis.json --config.engine.max_seq_len=512 "
     "--config.engine.decode_batch=8 --iters=2", "smaller disaggregated profile"),
    ("README.md", "--dataset_name=4k_256 --plot=pareto.png",
     "--dataset_name=4k_256 --plot=pareto.png --simulate_top=2 --compare_mix=false",
     "2 configurations simulated instead of 12 + the opposite mix (3 minutes)"),
    ("README.md", "--plan=plan.json --top=5", "--plan=plan.json --top=1 --steps=0",
     "one configuration, no bisection (each run serves the whole workload several times)"),
]

SKIPPED = [
    ("README.md", "--model_path=/path/to/Llama-3.2-1B", "needs a real Llama checkpoint"),
]

SLOW = [
    ("README.md", "--cluster=ray", "starts Ray and three worker processes (about 40 s)"),
    ("README.md", "launch/profile.py --mode=colocated",
     "two profiles, plans and a validation run: several minutes even at reduced sizes"),
    ("docs/TUTORIAL.md", "--output=dis.json",
     "the disaggregated profile serves calibration runs (1-2 minutes)"),
    ("docs/TUTORIAL.md", "cli.define_engine_flags()",
     "a second engine start-up in Python, the same engine as step 2's"),
    ("docs/TUTORIAL.md", "--backend=openai", "a second benchmark, through the HTTP server"),
    # Kept out of the default suite for its time budget (each block starts and compiles an
    # engine); what each does runs there in a test of its own.
    ("docs/TUTORIAL.md", "--mode=colocated --devices=2 --max_new_tokens=32",
     "both serving modes' generate.py: tests/launch/test_generate.py, tests/engine"),
    ("docs/TUTORIAL.md", "cat > prompts.jsonl", "prompt files: tests/launch/test_generate.py"),
    ("docs/TUTORIAL.md", "python launch/benchmark.py --mode=colocated --devices=2",
     "two benchmark runs: tests/launch/test_benchmark.py"),
    ("docs/TUTORIAL.md", 'for mode in ("colocated", "disagg")', "reads those benchmarks' JSON"),
    ("docs/TUTORIAL.md", "--iters=3 --output=col.json",
     "profile + simulate: tests/sim/test_timing.py, tests/launch/test_sim_scripts.py"),
    ("docs/TUTORIAL.md", "--profiles=col.json,dis.json", "needs the profiles"),
    ("docs/TUTORIAL.md", "--dataset_name=8k_128 --goodput=ttft:2000,tpot:50",
     "the planner: tests/sim/test_analytic_planner.py, tests/launch/test_plan_sweep_cli.py"),
]

SERVER = "launch/serve.py"
CLIENT = f"127.0.0.1:{DOCUMENTED_PORT}"


@dataclasses.dataclass
class Block:
  document: str
  line: int  # the block's first line in the document (1-based)
  language: str
  text: str

  @property
  def id(self) -> str:
    return f"{os.path.splitext(os.path.basename(self.document))[0]}-L{self.line}"


def read_blocks(document: str) -> list[Block]:
  """The ```bash and ```python fenced blocks of a markdown file, in order."""
  blocks, fence = [], None
  with open(os.path.join(REPO, document), encoding="utf-8") as f:
    lines = f.read().split("\n")
  for number, line in enumerate(lines, 1):
    if fence is None:
      match = re.match(r"^```(\w*)\s*$", line)
      if match:
        fence = (match.group(1), number + 1, [])
    elif line.startswith("```"):
      language, start, body = fence
      if language in ("bash", "python"):
        blocks.append(Block(document, start, language, "\n".join(body) + "\n"))
      fence = None
    else:
      fence[2].append(line)
  assert fence is None, f"{document}: unclosed code fence from line {fence[1] - 1}"
  return blocks


def entry_for(table, block: Block):
  return next((entry for entry in table
               if entry[0] == block.document and entry[1] in block.text), None)


def prepared_text(block: Block, port: int | None = None) -> str:
  """The block as the test runs it: README install lines reduced to their command,
  substitutions applied, the server's port replaced."""
  text = block.text
  if block.document == "README.md":
    kept = []
    for line in text.split("\n"):
      match = README_INSTALL.match(line.strip())
      if match:
        command = match.group("command").strip()
        if command in DROPPED_COMMANDS:
          continue
        line = command
      kept.append(line)
    text = "\n".join(kept)
  for document, old, new, _ in SUBSTITUTIONS:
    if document == block.document:
      text = text.replace(old, new)
  if port is not None:
    text = (text.replace(f"--port={DOCUMENTED_PORT}", f"--port={port}")
            .replace(CLIENT, f"127.0.0.1:{port}"))
  return text


ALL_BLOCKS = [block for document in DOCUMENTS for block in read_blocks(document)]


def is_server(block: Block) -> bool:
  return SERVER in block.text


def is_client(block: Block) -> bool:
  return CLIENT in block.text and not is_server(block)


def is_slow(block: Block) -> bool:
  return entry_for(SLOW, block) is not None


def _params():
  params = []
  for block in ALL_BLOCKS:
    marks = []
    skipped = entry_for(SKIPPED, block)
    if skipped:
      marks.append(pytest.mark.skip(reason=skipped[2]))
    elif is_slow(block):
      marks.append(pytest.mark.slow)
    params.append(pytest.param(block, id=block.id, marks=marks))
  return params


# ---------------------------------------------------------------------------- running blocks

@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """One working directory per document, with links to launch/ and configs/."""
  dirs = {}
  for document in DOCUMENTS:
    path = tmp_path_factory.mktemp(os.path.splitext(os.path.basename(document))[0].lower())
    for name in LINKED_DIRS:
      os.symlink(os.path.join(REPO, name), path / name)
    dirs[document] = str(path)
  return dirs


def _env() -> dict:
  env = dict(os.environ)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  env.pop("DISAGG_JAX_TRACEBACK", None)
  return env


def run_text(block: Block, text: str, cwd: str, timeout: float) -> subprocess.CompletedProcess:
  if block.language == "python":
    path = os.path.join(cwd, f"block_{block.line}.py")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    command = [sys.executable, path]
  else:
    command = ["bash", "-c", "set -eo pipefail\n" + text]
  return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True,
                        timeout=timeout)


class Runner:
  """Runs each block at most once per session, after the earlier blocks it may depend on."""

  def __init__(self, workdirs):
    self.workdirs = workdirs
    self.results: dict[str, subprocess.CompletedProcess | Exception] = {}

  def prerequisites(self, block: Block) -> list[Block]:
    earlier = [b for b in ALL_BLOCKS if b.document == block.document and b.line < block.line]
    return [b for b in earlier
            if not entry_for(SKIPPED, b) and not is_server(b) and not is_client(b)
            and (is_slow(block) or not is_slow(b))]

  def run(self, block: Block) -> subprocess.CompletedProcess:
    for before in self.prerequisites(block):
      outcome = self._once(before)
      if isinstance(outcome, Exception) or outcome.returncode != 0:
        pytest.fail(f"an earlier block this one may depend on failed: {before.id}")
    outcome = self._once(block)
    if isinstance(outcome, Exception):
      raise outcome
    return outcome

  def _once(self, block: Block):
    if block.id not in self.results:
      timeout = 1800 if is_slow(block) else 600
      try:
        self.results[block.id] = run_text(block, prepared_text(block),
                                          self.workdirs[block.document], timeout)
      except subprocess.TimeoutExpired as e:
        self.results[block.id] = e
    return self.results[block.id]


@pytest.fixture(scope="module")
def runner(workdirs):
  return Runner(workdirs)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """A document's server block, running in the background."""

  def __init__(self, block: Block, cwd: str):
    self.port = _free_port()
    self.lines: list[str] = []
    self.process = subprocess.Popen(
        ["bash", "-c", "exec " + prepared_text(block, self.port).strip()], cwd=cwd,
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout),
                                   daemon=True)
    self.reader.start()

  def wait_listening(self, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not any("Uvicorn running on" in line for line in self.lines):
      if self.process.poll() is not None:
        raise AssertionError("the server exited:\n" + self.log())
      if time.time() > deadline:
        raise AssertionError("the server did not start listening:\n" + self.log())
      time.sleep(0.2)

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.send_signal(signal.SIGINT)
      try:
        self.process.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.reader.join(timeout=10)

  def log(self) -> str:
    return "".join(self.lines)[-4000:]


@pytest.fixture(scope="module")
def servers(workdirs):
  """{document: Server}, started on first use, stopped at the end of the module."""
  started: dict[str, Server] = {}

  def get(document: str) -> Server:
    if document not in started:
      block = next(b for b in ALL_BLOCKS if b.document == document and is_server(b))
      server = Server(block, workdirs[document])
      started[document] = server
      server.wait_listening()
    return started[document]

  yield get
  for server in started.values():
    server.stop()
    assert "server stopped; engine shut down" in server.log(), server.log()


def _report(block: Block, text: str, done) -> str:
  return (f"{block.id} exited {done.returncode}\n--- ran:\n{text}\n--- stdout (end):\n"
          f"{done.stdout[-3000:]}\n--- stderr (end):\n{done.stderr[-3000:]}")


@pytest.mark.parametrize("block", _params())
def test_block_runs(block: Block, runner, servers):
  if is_server(block):
    server = servers(block.document)
    assert f"on http://127.0.0.1:{server.port}/v1" in server.log(), server.log()
    return
  if is_client(block):
    server = servers(block.document)
    text = prepared_text(block, server.port)
    done = run_text(block, text, runner.workdirs[block.document], timeout=600)
    assert done.returncode == 0, _report(block, text, done)
    # curl prints an error body and exits 0; the benchmark counts failed requests and exits 0.
    assert '{"error"' not in done.stdout, _report(block, text, done)
    assert "requests failed" not in done.stdout, _report(block, text, done)
    return
  done = runner.run(block)
  assert done.returncode == 0, _report(block, prepared_text(block), done)


# ---------------------------------------------------------------------------- the tables

def test_tables_match_the_docs():
  """Every substitution, skip and slow entry matches a block; every skip and slow entry exactly
  one; the server and its clients are where the fixture expects them."""
  for document, old, _, _ in SUBSTITUTIONS:
    hits = [b for b in ALL_BLOCKS if b.document == document and old in b.text]
    assert len(hits) == 1, (document, old, [b.id for b in hits])
  for table in (SKIPPED, SLOW):
    for document, text, _ in table:
      hits = [b for b in ALL_BLOCKS if b.document == document and text in b.text]
      assert len(hits) == 1, (document, text, [b.id for b in hits])
  for document in DOCUMENTS:
    blocks = [b for b in ALL_BLOCKS if b.document == document]
    servers = [b for b in blocks if is_server(b)]
    assert len(servers) <= 1, [b.id for b in servers]
    for client in (b for b in blocks if is_client(b)):
      assert servers and servers[0].line < client.line, client.id
  readme = [b for b in ALL_BLOCKS if b.document == "README.md"]
  assert any(README_INSTALL.match(line.strip()) for b in readme for line in b.text.split("\n"))
  assert any(b.language == "python" for b in readme), "README.md has no Python snippet"


def test_readme_install_lines_keep_only_their_command():
  block = Block("README.md", 1, "bash",
                "python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
                "python launch/generate.py --mode=disagg\n"
                "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && "
                "python -m pytest -q\n")
  assert prepared_text(block).strip() == "python launch/generate.py --mode=disagg"


# ---------------------------------------------------------------------------- links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _markdown_files() -> list[str]:
  docs = os.path.join(REPO, "docs")
  return ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(docs)
                                if name.endswith(".md"))


def heading_anchors(path: str) -> set[str]:
  """GitHub's anchors of a markdown file's headings (outside code fences)."""
  anchors, in_fence = set(), False
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("```"):
        in_fence = not in_fence
      elif not in_fence and line.startswith("#"):
        title = line.lstrip("#").strip().lower()
        anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
  return anchors


@pytest.mark.parametrize("document", _markdown_files())
def test_links_resolve_inside_the_repository(document):
  path = os.path.join(REPO, document)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  assert "../shared" not in text, f"{document} refers to a path outside the repository"
  for target in LINK.findall(text):
    if re.match(r"^[a-z]+:", target):  # https:, mailto:
      continue
    file_part, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part \
        else path
    assert os.path.commonpath([resolved, REPO]) == REPO, f"{document}: {target} leaves the repo"
    assert os.path.exists(resolved), f"{document}: {target} does not exist"
    if anchor and resolved.endswith(".md"):
      assert anchor in heading_anchors(resolved), f"{document}: no heading for {target}"


def test_heading_anchors_follow_github():
  assert heading_anchors(os.path.join(REPO, "docs", "CLI.md")) >= {
      "launchsweeppy--ablation-sweeps", "common-behaviour"}


# ---------------------------------------------------------------------------- the CLI reference

REFERENCED_SCRIPTS = ("generate", "benchmark", "serve", "sweep", "profile", "simulate", "plan",
                      "validate_plan")


def _defined_flags(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", f.read())


def test_cli_reference_lists_every_flag_and_config_field():
  """docs/CLI.md names every shared flag (disagg_jax/cli.py), every flag of the scripts it
  documents in full, and every field of configs/engine.py; and every flag it names exists."""
  with open(os.path.join(REPO, "docs", "CLI.md"), encoding="utf-8") as f:
    doc = f.read()
  defined = set(_defined_flags(os.path.join(REPO, "disagg_jax", "cli.py")))
  missing = [f"cli.py: --{name}" for name in sorted(defined) if f"`--{name}`" not in doc]
  for script in REFERENCED_SCRIPTS:
    own = _defined_flags(os.path.join(REPO, "launch", f"{script}.py"))
    defined.update(own)
    missing += [f"{script}.py: --{name}" for name in own if f"`--{name}`" not in doc]
  with open(os.path.join(REPO, "configs", "engine.py"), encoding="utf-8") as f:
    fields = re.findall(r"^ {6}(\w+)=", f.read(), re.M)
  missing += [f"configs/engine.py: {name}" for name in fields if f"| `{name}` |" not in doc]
  assert not missing, f"docs/CLI.md does not document: {missing}"
  everywhere = set()
  for name in os.listdir(os.path.join(REPO, "launch")):
    if name.endswith(".py"):
      with open(os.path.join(REPO, "launch", name), encoding="utf-8") as f:
        everywhere.update(re.findall(r"[\"'](?:--)?(\w+)[\"']", f.read()))
  named = set(re.findall(r"`--(\w+)", doc))
  generic = ("help", "helpfull", "name", "noname")  # absl's own, and the boolean syntax
  unknown = sorted(n for n in named - defined - everywhere if n not in generic)
  assert not unknown, f"docs/CLI.md names flags no script defines: {unknown}"
