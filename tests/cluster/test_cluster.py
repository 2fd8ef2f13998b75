"""Prefill and decode workers in separate processes (Ray actors) over loopback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from disagg_jax.cluster.driver import ClusterEngine
from disagg_jax.engine.engine import EngineConfig
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.kv.pages import pages_for
from disagg_jax.models import loading
from disagg_jax.sched.elastic import TO_PREFILL, Decision, ElasticConfig
from disagg_jax.testing import helpers, tiny_hf
from disagg_jax.transfer.pieces import page_blocks

CONFIG = EngineConfig(max_seq_len=128, decode_batch=4, prefill_batch=2)
SAMPLING = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
  return hf_checkpoint("llama3")[0]


@pytest.fixture(scope="module")
def prompts():
  return helpers.random_prompts((1, 17, 40, 100, 5, 33, 64, 2), tiny_hf.VOCAB, seed=41)


@pytest.fixture(scope="module")
def expected(model_dir, prompts):
  model = loading.load_model(model_dir, helpers.mesh())
  return [o.output_token_ids for o in helpers.static_generator(model).generate(prompts, SAMPLING)]


def run_script(repo_root, script, *flags):
  result = subprocess.run([sys.executable, os.path.join(repo_root, "launch", script), *flags],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.parametrize("prefill_workers, decode_workers, transfer", [
    (1, 1, "request"), pytest.param(2, 1, "request", marks=pytest.mark.slow), (1, 2, "layers:1")])
def test_generate_script_matches_single(prefill_workers, decode_workers, transfer, model_dir,
                                        prompts, expected, tmp_path, repo_root):
  in_path, out_path = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  in_path.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
  run_script(repo_root, "generate.py", f"--model_path={model_dir}", "--mode=disagg",
             "--cluster=ray", f"--num_prefill_workers={prefill_workers}",
             f"--num_decode_workers={decode_workers}", f"--prompts_file={in_path}",
             f"--output_file={out_path}", "--max_new_tokens=12", "--config.engine.max_seq_len=128",
             "--config.engine.decode_batch=4", f"--config.engine.transfer={transfer}")
  outputs = [json.loads(l)["output_token_ids"] for l in out_path.read_text().splitlines()]
  assert outputs == expected


@pytest.mark.slow  # 26 s; the generate and kill tests cover the cluster by default
def test_benchmark_script_matches_single(model_dir, tmp_path, repo_root):
  out = tmp_path / "result.json"
  flags = [f"--model_path={model_dir}", "--num_prompts=24", "--request_rate=30",
           "--random_input_len=30", "--random_output_len=10", "--random_range_ratio=0.5",
           "--config.engine.max_seq_len=128", "--config.engine.decode_batch=4",
           "--progress=false", "--seed=5"]
  run_script(repo_root, "benchmark.py", *flags, "--mode=disagg", "--cluster=ray",
             "--num_prefill_workers=2", "--num_decode_workers=1", f"--output_json={out}")
  result = json.loads(out.read_text())
  assert result["completed"] == 24 and result["failed"] == 0 and result["mean_transfer_ms"] > 0
  records = [json.loads(l) for l in (tmp_path / "result.json.requests.jsonl").read_text()
             .splitlines()]
  local = tmp_path / "local.json"
  run_script(repo_root, "benchmark.py", *flags, "--mode=colocated", f"--output_json={local}")
  local_records = [json.loads(l) for l in (tmp_path / "local.json.requests.jsonl").read_text()
                   .splitlines()]
  assert [r["output_token_ids"] for r in records] == [r["output_token_ids"] for r in local_records]


def wait_for(predicate, timeout=60, what="condition"):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("policy", [pytest.param("error", marks=pytest.mark.slow), "reprefill"])
def test_decode_worker_killed_mid_stream(policy, model_dir, prompts, expected):
  # With log-probabilities (from both workers' events) and a penalty (its history rebuilt on the
  # surviving worker): both survive the recomputation.
  long = SamplingParams(max_new_tokens=80, ignore_eos=True, logprobs=2, repetition_penalty=1.3)
  chosen = prompts[:2] + prompts[4:6]  # <= 33 tokens: 80 more fit in max_seq_len
  reference = helpers.static_generator(loading.load_model(model_dir, helpers.mesh())).generate(
      chosen, long)
  with ClusterEngine(model_dir, CONFIG, num_prefill_workers=1, num_decode_workers=2,
                     on_decode_failure=policy, progress=False) as engine:
    streams = [engine.add_request(p, long) for p in chosen]
    wait_for(lambda: all(len(s._queue.queue) >= 3 for s in streams), what="tokens streaming")
    # The worker holding the most of them (routing follows free pages, so not always worker 0).
    victim = max(engine.decode_workers, key=lambda w: len(w.requests))
    os.kill(victim.pid, signal.SIGKILL)
    start = time.time()
    outputs = [s.result(timeout=120) for s in streams]
    assert time.time() - start < 60  # ended or recomputed within the deadline, nothing hung
    hit = [o for o in outputs if o.finish_reason == "error"]
    if policy == "error":
      assert hit and all(f"decode worker {victim.index}" in o.error and "died" in o.error
                         for o in hit)
    else:
      # Recomputed from prompt + tokens so far on the surviving worker: the same tokens.
      assert not hit
      assert [o.output_token_ids for o in outputs] == [r.output_token_ids for r in reference]
      for out, ref in zip(outputs, reference):
        assert len(out.logprobs) == 80
        for ours, theirs in zip(out.logprobs, ref.logprobs):
          assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-4)
          assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
    # The cluster keeps serving on the surviving decode worker.
    fresh = engine.generate(prompts, SAMPLING)
    assert [o.output_token_ids for o in fresh] == expected
    assert engine.stats()["decode_workers_alive"] == 1


def test_prefill_worker_killed_with_a_queue(model_dir, prompts, expected):
  with ClusterEngine(model_dir, CONFIG, num_prefill_workers=2, num_decode_workers=1,
                     progress=False) as engine:
    streams = [engine.add_request(p, SAMPLING) for p in prompts * 3]
    os.kill(engine.prefill_workers[0].pid, signal.SIGKILL)
    outputs = [s.result(timeout=120) for s in streams]
    assert [o.output_token_ids for o in outputs] == expected * 3
    assert engine.stats()["prefill_workers_alive"] == 1


def test_unpulled_kv_expires_and_is_freed(model_dir, prompts):
  with ClusterEngine(model_dir, CONFIG, num_prefill_workers=1, num_decode_workers=1,
                     kv_lease_s=1.0, on_decode_failure="error", progress=False) as engine:
    os.kill(engine.decode_workers[0].pid, signal.SIGKILL)
    wait_for(lambda: engine.stats()["decode_workers_alive"] == 0, what="decode worker death")
    outputs = engine.generate(prompts[:3], SAMPLING)  # prefilled, offered, never pulled
    assert all(o.finish_reason == "error" and "no decode worker is alive" in o.error
               for o in outputs)
    # One offer per KV piece: a page block of each prompt's pages (transfer.pieces).
    offered = sum(len(page_blocks(pages_for(len(p), CONFIG.page_size))) for p in prompts[:3])
    assert offered == 4  # 1, 2 and 3 pages
    wait_for(lambda: engine.stats()["kv_offers_expired"] == offered
             and engine.stats()["kv_offers"] == 0, timeout=30, what="leases to expire")


@pytest.mark.slow  # ~45 s; the router's decisions: tests/sched/test_routing.py
def test_prefix_routing_returns_to_the_prefill_worker_that_cached_it(model_dir):
  """Two caching prefill workers: every prompt of the second pass goes back to the worker
  that computed it in the first, so all its full pages are found cached; tokens unchanged."""
  prefix, *tails = helpers.random_prompts((48, 20, 9, 30, 14), tiny_hf.VOCAB, seed=43)
  prompts = [prefix + t for t in tails] + tails
  model = loading.load_model(model_dir, helpers.mesh())
  expected = [o.output_token_ids
              for o in helpers.static_generator(model).generate(prompts, SAMPLING)]
  config = EngineConfig(**{**CONFIG.__dict__, "prefill_cache_tokens": 512, "routing": "prefix"})
  with ClusterEngine(model_dir, config, num_prefill_workers=2, num_decode_workers=1,
                     progress=False) as engine:
    assert [w.cache_pages for w in engine.prefill_workers] == [32, 32]
    for _ in range(2):
      outputs = [engine.generate([p], SAMPLING)[0] for p in prompts]  # one at a time
      assert [o.output_token_ids for o in outputs] == expected
    assert [o.metrics.cached_tokens for o in outputs] == [(len(p) - 1) // 16 * 16
                                                          for p in prompts]


@pytest.mark.slow  # ~25 s; the router's decisions: tests/sched/test_routing.py
def test_a_follow_up_turn_is_prefilled_by_the_decode_worker_that_holds_it(model_dir):
  """Decode-side prefill on two decode workers (no prefill cache): each conversation's second
  turn goes straight to the decode worker that decoded its first, which finds the first turn
  cached and computes only the new message."""
  first = helpers.random_prompts((30, 45, 20, 60), tiny_hf.VOCAB, seed=44)
  messages = helpers.random_prompts((10, 12, 8, 14), tiny_hf.VOCAB, seed=45)
  model = loading.load_model(model_dir, helpers.mesh())
  generator = helpers.static_generator(model)
  answers = [o.output_token_ids for o in generator.generate(first, SAMPLING)]
  second = [p + a + m for p, a, m in zip(first, answers, messages)]
  expected = [o.output_token_ids for o in generator.generate(second, SAMPLING)]
  config = EngineConfig(**{**CONFIG.__dict__, "prefill_cache_tokens": 0,
                           "decode_prefill_tokens": 32, "chunk_size": 32, "routing": "prefix"})
  with ClusterEngine(model_dir, config, num_prefill_workers=1, num_decode_workers=2,
                     progress=False) as engine:
    assert [w.max_tail for w in engine.decode_workers] == [32, 32]
    assert [o.output_token_ids for o in engine.generate(first, SAMPLING)] == answers
    outputs = [engine.generate([p], SAMPLING)[0] for p in second]
    assert [o.output_token_ids for o in outputs] == expected
    # The first turn's KV, whole pages: the prompt and the whole answer (the decode loop runs a
    # step ahead, so the last answer token's KV was written too), short of the last token.
    assert [o.metrics.cached_tokens for o in outputs] == [
        min(len(p) + len(a), len(s) - 1) // 16 * 16 for p, a, s in zip(first, answers, second)]
    assert all(o.metrics.first_token is not None for o in outputs)


class _AskPrefill:
  """A controller stub asking for one worker more on prefill, once (the policy itself:
  tests/sched/test_elastic.py)."""

  def __init__(self):
    self.log = []

  def decide(self, signals):
    action = TO_PREFILL if not self.log else None
    self.log.append(Decision(signals.time, action, "test", signals, 1 if action else 0))
    return action


@pytest.mark.slow  # ~20 s (workers start and retire); in-process moves: test_elastic_engine.py
def test_workers_change_role_under_load(model_dir, prompts, expected):
  elastic = ElasticConfig(ttft_slo_s=5.0, tpot_slo_s=1.0, window_s=600.0)
  with ClusterEngine(model_dir, CONFIG, num_prefill_workers=2, num_decode_workers=1,
                     progress=False, elastic=elastic) as engine:
    streams = [engine.add_request(p, SAMPLING) for p in prompts * 2]
    wait_for(lambda: any(len(s._queue.queue) >= 2 for s in streams), what="tokens streaming")
    # A prefill worker drains (its queue prefilled, its KV pulled) and a decode worker starts.
    first = engine.move_worker("decode")
    streams += [engine.add_request(p, SAMPLING) for p in prompts]
    stats = engine.stats()
    assert (stats["prefill_workers"], stats["decode_workers"]) == (1, 2)
    assert (stats["prefill_devices"], stats["decode_devices"]) == (1, 2)
    with pytest.raises(ValueError, match="each side keeps one"):
      engine.move_worker("decode")
    # The control step: the workers' signals to the controller, and its move back.
    engine.controller = _AskPrefill()
    second = engine.control_step()
    signals = engine.controller.log[0].signals
    outputs = [s.result(timeout=120) for s in streams]
    assert [o.output_token_ids for o in outputs] == expected * 3  # nothing lost, same tokens
    assert all(o.finish_reason == "length" for o in outputs)
    assert first["recomputed_tokens"] == 0 and sum(o.metrics.preemptions for o in outputs) == 0
    assert (signals.prefill_workers, signals.decode_workers) == (1, 2)
    assert signals.prefill_tokens_per_s > 0 and signals.decode_tokens_per_s_per_worker > 0
    assert signals.arriving_prompt_tokens_per_s > 0
    assert [s["prefill_devices"] for s in second] == [2]
    assert [t[1:] for t in engine.split_timeline] == [[2, 1], [1, 2], [2, 1]]
    assert engine.health() == ("ok", None)  # retired workers are not dead ones
    report = engine.report()
    assert report["split_changes"] == 2 and len(report["elastic_decisions"]) == 1
    fresh = engine.generate(prompts, SAMPLING)  # the new workers serve
    assert [o.output_token_ids for o in fresh] == expected
