"""launch/generate.py end to end, per the file contract of DESIGN.md."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from disagg_jax.models.tokenizer import load_tokenizer
from disagg_jax.testing import helpers, tiny_hf


def run_generate(repo_root, *flags, check=True):
  result = subprocess.run([sys.executable, os.path.join(repo_root, "launch", "generate.py"),
                           *flags], capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"generate.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return result


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def qwen_with_tokenizer(hf_checkpoint):
  model_dir, hf_model = hf_checkpoint("qwen2")
  if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
    tiny_hf.write_tokenizer(model_dir)
  return model_dir, hf_model


def test_jsonl_round_trip_matches_transformers(qwen_with_tokenizer, tmp_path, repo_root):
  model_dir, hf_model = qwen_with_tokenizer
  tokenizer = load_tokenizer(model_dir)
  prompts = helpers.random_prompts((1, 30, 250), tiny_hf.VOCAB, seed=7)
  lines = [{"prompt_token_ids": p} for p in prompts]
  lines.insert(1, {"prompt": "The quick brown fox", "max_new_tokens": 5})
  in_path, out_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  in_path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  result = run_generate(repo_root, f"--model_path={model_dir}", f"--prompts_file={in_path}",
                        f"--output_file={out_path}", "--mode=single", "--max_new_tokens=24",
                        "--logprobs=2")
  # The phase times leave compilation out (a tiny model's prefill takes far less).
  times = re.search(r"prefill (\d+) ms; decode (\d+) ms .* compiling the steps (\d+) ms",
                    result.stdout)
  assert times and int(times[1]) < int(times[3]), result.stdout
  outputs = read_jsonl(out_path)
  assert len(outputs) == 4
  text_ids = tokenizer.encode("The quick brown fox")
  assert text_ids[0] == tiny_hf.BOS  # the tokenizer.json's post-processor added BOS
  expected_prompts = [prompts[0], text_ids, prompts[1], prompts[2]]
  for out, prompt in zip(outputs, expected_prompts):
    assert set(out) == {"prompt_token_ids", "output_token_ids", "text", "finish_reason",
                        "logprobs"}
    # [logprob, [[id, logprob] x 2]] per token; greedy: the token is the most likely one.
    assert len(out["logprobs"]) == len(out["output_token_ids"])
    for token, (logprob, top) in zip(out["output_token_ids"], out["logprobs"]):
      assert len(top) == 2 and top[0] == [token, pytest.approx(logprob, abs=1e-6)]
    assert out["prompt_token_ids"] == prompt
    max_new = 5 if prompt is text_ids else 24
    assert out["output_token_ids"] == helpers.hf_greedy(hf_model, prompt, max_new, (tiny_hf.EOS,))
    assert out["text"] == tokenizer.decode(out["output_token_ids"])
    assert out["finish_reason"] in ("stop", "length")


def test_bad_lines_are_reported_and_the_rest_generated(qwen_with_tokenizer, tmp_path, repo_root):
  model_dir, _ = qwen_with_tokenizer
  good = {"prompt_token_ids": [5, 6, 7, 8]}
  lines = [json.dumps(good), "{not json", json.dumps({"prompt_token_ids": []}),
           json.dumps({"prompt_token_ids": [3] * 600}), json.dumps({"prompt_token_ids": [3, 999]}),
           json.dumps({"prompt": "hi", "max_new_tokens": 0}), json.dumps(good)]
  in_path, out_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  in_path.write_text("\n".join(lines) + "\n")
  result = run_generate(repo_root, f"--model_path={model_dir}", f"--prompts_file={in_path}",
                        f"--output_file={out_path}", "--max_new_tokens=6", check=False)
  assert result.returncode == 1
  outputs = read_jsonl(out_path)
  assert len(outputs) == 7
  assert outputs[0]["output_token_ids"] == outputs[6]["output_token_ids"]
  assert outputs[0]["finish_reason"] in ("stop", "length") and "error" not in outputs[0]
  errors = [o.get("error", "") for o in outputs]
  assert "line 2: not valid JSON" in errors[1]
  assert "line 3: prompt is empty" in errors[2]
  assert "line 4: prompt has 600 tokens; max_prefill_length is 512" in errors[3]
  assert "line 5: prompt token 1 is 999, outside the vocabulary [0, 384)" in errors[4]
  assert "line 6: max_new_tokens must be at least 1, got 0" in errors[5]
  assert all(o["finish_reason"] == "error" for o in outputs[1:6])
  assert "line 4: prompt has 600 tokens" in result.stderr


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "temperature must be finite and >= 0, got -1.0"),
    ("--temperature=nan", "temperature must be a number >= 0, got nan"),
    ("--top_p=1.5", r"top_p must be in (0, 1], got 1.5"),
    ("--repetition_penalty=0", "repetition_penalty must be a finite number > 0"),
    ("--logprobs=30", "logprobs must be an integer in [0, 20], got 30"),
    ("--mode=bogus", "value should be one of <single|colocated|disagg>"),
    ("--attention_impl=cuda", "value should be one of <auto|xla|pallas>"),
    ("--tp=3", "tp=3 must be positive and divide the mesh's 1 devices"),
])
def test_bad_flags_fail_before_running(flag, message, repo_root):
  result = run_generate(repo_root, flag, check=False)
  assert result.returncode == 2
  assert message in result.stderr
  # One line naming the problem: no help dump, no traceback.
  assert "Traceback" not in result.stderr and "flags:" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("flag, message", [
    ("--config.engine.decode_bach=8",
     "error: no such config field: decode_bach; did you mean decode_batch?"),
    ("--prompts_file=/nonexistent/in.jsonl",
     "error: --prompts_file=/nonexistent/in.jsonl: no such file"),
])
def test_mistakes_get_one_line_and_exit_2(flag, message, repo_root):
  start = time.time()
  result = run_generate(repo_root, flag, check=False)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), lines
  assert time.time() - start < 60  # before loading and compiling anything


def test_help_shows_the_shared_flags_and_the_config_fields(repo_root):
  result = run_generate(repo_root, "--help", check=False)  # absl's --help exits 1
  for text in ("--mode:", "--prefill_devices:", "--temperature:", "--dtype:",
               "--config.engine.decode_batch=32:", "--config.engine.prefix_caching=True:"):
    assert text in result.stdout, text
  assert "DESIGN.md" not in result.stdout


def test_disagg_on_defaults_runs_on_cpu(repo_root):
  """--mode=disagg without --num_cpu_devices: two CPU devices are simulated for the two meshes;
  the prompt and its continuation are printed apart."""
  result = run_generate(repo_root, "--mode=disagg", "--max_new_tokens=4")
  assert "4 prompts generated, 0 failed" in result.stdout
  assert "--- prompt 1 ---" in result.stdout and "--- output 1 (" in result.stdout
