"""The quick-start notebook runs top to bottom (so it cannot rot)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient


@pytest.mark.slow  # 80 s: the notebook's cells are the README's, tested by their own tests
def test_quickstart_notebook_executes(repo_root):
  path = os.path.join(repo_root, "notebooks", "quickstart.ipynb")
  notebook = nbformat.read(path, as_version=4)
  env_before = os.environ.get("JAX_PLATFORMS")
  os.environ["JAX_PLATFORMS"] = "cpu"
  try:
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
  finally:
    if env_before is None:
      os.environ.pop("JAX_PLATFORMS", None)
    else:
      os.environ["JAX_PLATFORMS"] = env_before
  outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                    for o in cell.get("outputs", []))
  assert "8 devices" in outputs
  assert "Mean TTFT (ms):" in outputs and "disagg" in outputs
  images = [o for cell in notebook.cells for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) == 5
