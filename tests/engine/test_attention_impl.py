"""--attention_impl=pallas (kernels interpreted on CPU) gives the XLA path's greedy tokens."""

import json
import os
import subprocess
import sys

import pytest

from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.models import loading
from disagg_jax.testing import helpers, tiny_hf


@pytest.mark.parametrize("family, tp", [pytest.param("llama3", 1, marks=pytest.mark.slow),
                                        pytest.param("qwen2", 1, marks=pytest.mark.slow),
                                        ("qwen3", 2),
                                        pytest.param("mistral", 1, marks=pytest.mark.slow)])
def test_pallas_matches_xla_greedy(family, tp, hf_checkpoint):
  model = loading.load_model(hf_checkpoint(family)[0], helpers.mesh(tp, tp))
  prompts = helpers.random_prompts((1, 16, 17, 45), tiny_hf.VOCAB, seed=11)
  tokens = {}
  for impl in ("xla", "pallas"):
    generator = helpers.static_generator(model, attention_impl=impl)
    outputs = generator.generate(prompts, SamplingParams(max_new_tokens=10))
    tokens[impl] = [o.output_token_ids for o in outputs]
  assert tokens["pallas"] == tokens["xla"]


def test_generate_script_with_pallas(hf_checkpoint, tmp_path, repo_root):
  model_dir, _ = hf_checkpoint("llama3_legacy_rope")
  prompts = helpers.random_prompts((3, 33), tiny_hf.VOCAB, seed=12)
  in_path = tmp_path / "in.jsonl"
  in_path.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
  outputs = {}
  for impl in ("xla", "pallas"):
    out_path = tmp_path / f"{impl}.jsonl"
    subprocess.run([sys.executable, os.path.join(repo_root, "launch", "generate.py"),
                    f"--model_path={model_dir}", f"--prompts_file={in_path}",
                    f"--output_file={out_path}", f"--attention_impl={impl}",
                    "--max_new_tokens=12"], check=True, capture_output=True, timeout=600)
    outputs[impl] = [json.loads(l)["output_token_ids"] for l in out_path.read_text().splitlines()]
  assert outputs["pallas"] == outputs["xla"] and len(outputs["xla"]) == 2
