"""The simulator makes the engine's decisions: both drive `sched.policy`, and this checks it end to end.

The engine serves a workload with arrivals spread over time while recording every decision it
takes (admissions, chunks, decode rows, preemptions; prefill batches, KV inserts) and every
hand-over between its queues, each with its time. The simulator is then fed the same requests,
their recorded arrival times and the recorded step times (the times at which each loop took its
decisions), and must take the same decisions in the same order. With a pool far too small for
the load, preemption is part of it.
"""

import threading
import time

import numpy as np
import pytest

from disagg_jax.engine import buckets
from disagg_jax.engine.engine import Engine, EngineConfig
from disagg_jax.engine.sampling import SamplingParams
from disagg_jax.models import loading
from disagg_jax.sched.trace import Trace
from disagg_jax.sim import simulator
from disagg_jax.sim.profile import StepProfile
from disagg_jax.testing import helpers, tiny_hf


def _engine(model_dir, mode, config):
  prefill = loading.load_model(model_dir, helpers.mesh(1, 1, start=0))
  if mode == "colocated":
    return Engine.create("colocated", prefill, config=config, progress=False)
  decode = loading.load_model(model_dir, helpers.mesh(1, 1, start=4))
  return Engine.create("disagg", prefill, decode, config=config, progress=False)


def _attach(engine, trace):
  if engine.mode == "colocated":
    engine.scheduler.trace = trace
  else:
    engine.prefill.trace = engine.decode_loop.trace = engine.staging.trace = trace


def _profile(engine, config) -> StepProfile:
  """A table with the engine's shapes and limits; its times do not matter when replaying."""
  slots = engine.core.slots
  base = dict(mode=engine.mode, page_size=config.page_size, decode_batch=config.decode_batch,
              num_pages=slots.capacity, max_seq_len=config.max_seq_len, decode_s=0.001,
              prefix_caching=slots.prefix_caching, run_ahead=config.run_ahead)
  if engine.mode == "colocated":
    return StepProfile(**base, chunk_size=config.chunk_size, chunk_batch=config.chunk_batch,
                       mixed_s={(b, c): 0.001 for b in buckets.chunk_rows(config.chunk_batch)
                                for c in buckets.chunk_lens(config.chunk_size)})
  lb = tuple(engine.length_buckets)
  return StepProfile(**base, prefill_batch=config.prefill_batch, length_buckets=lb,
                     staging_tokens=engine.pool.staging_tokens,
                     prefill_s={(b, s): 0.001 for s in lb
                                for b in engine.prefill.batch_buckets_for(s)},
                     insert_s={s: 0.001 for s in lb}, transfer_s={s: 0.001 for s in lb})


def _serve(engine, prompts, sampling, gaps):
  """Submits request i after gaps[i] seconds (request ids "0", "1", ...) and waits for all."""
  streams = []

  def submit():
    for i, (prompt, params) in enumerate(zip(prompts, sampling)):
      time.sleep(gaps[i])
      streams.append(engine.add_request(prompt, params, request_id=str(i)))
  thread = threading.Thread(target=submit)
  thread.start()
  thread.join()
  return [s.result(timeout=300) for s in streams]


@pytest.mark.parametrize("mode, num_pages, shared, run_ahead", [
    # By default both modes with preemption (a small pool), run ahead and not; colocated also
    # with prefix caching. Every decision of the larger pools' runs also occurs in these.
    pytest.param("colocated", None, 0, True, marks=pytest.mark.slow),
    pytest.param("colocated", 10, 0, True, marks=pytest.mark.slow),
    pytest.param("colocated", None, 40, True, marks=pytest.mark.slow),
    pytest.param("disagg", None, 0, True, marks=pytest.mark.slow),
    ("colocated", 12, 40, True), ("disagg", 10, 0, True),
    ("colocated", 12, 40, False), ("disagg", 10, 0, False)])
def test_simulator_takes_the_engines_decisions(mode, num_pages, shared, run_ahead,
                                               hf_checkpoint):
  """`shared`: every prompt starts with the same `shared` tokens (prefix caching at work);
  `run_ahead`: --config.engine.run_ahead (false: each step read before the next is decided)."""
  model_dir, _ = hf_checkpoint("llama3")
  # 9 usable pages of 16 tokens for 4 slots of up to 98 tokens: growth must preempt. The
  # simulator's disaggregated model has dense prefill batches: the prefill cache stays off.
  config = EngineConfig(max_seq_len=128 + shared, decode_batch=4, prefill_batch=2, chunk_size=32,
                        chunk_batch=2, num_pages=num_pages, prefill_cache_tokens=0,
                        run_ahead=run_ahead)
  rng = np.random.default_rng(7)
  n = 32
  if num_pages is None:
    prompt_lens, output_lens = rng.integers(1, 70, n), rng.integers(1, 26, n)
  else:  # long outputs: sequences grow past what the pool holds
    prompt_lens, output_lens = rng.integers(1, 40, n), rng.integers(20, 60, n)
  prompts = helpers.random_prompts(prompt_lens, tiny_hf.VOCAB, seed=8)
  if shared:
    prefix = helpers.random_prompts([shared], tiny_hf.VOCAB, seed=9)[0]
    prompts = [list(prefix) + list(p) for p in prompts]
    prompt_lens = np.array([len(p) for p in prompts])
  sampling = [SamplingParams(max_new_tokens=int(k), ignore_eos=True) for k in output_lens]
  gaps = rng.exponential(0.01, n)
  with _engine(model_dir, mode, config) as engine:
    # Compiles what start-up did not (other prompts: nothing of them is cached for the run).
    _serve(engine, helpers.random_prompts(prompt_lens[:4], tiny_hf.VOCAB, seed=10),
           sampling[:4], [0.0] * 4)
    trace = Trace()
    _attach(engine, trace)
    outputs = _serve(engine, prompts, sampling, gaps)
    profile = _profile(engine, config)
  assert [len(o.output_token_ids) for o in outputs] == list(output_lens)

  worker = "colocated" if mode == "colocated" else "prefill"
  enqueued = {p[0]: t for t, p in trace.of(worker, "enqueue") if not p[1]}
  arrivals = [enqueued[str(i)] for i in range(n)]
  replayed = Trace()
  if mode == "colocated":
    simulator.simulate_colocated(profile, prompt_lens, output_lens, arrivals,
                                 replay=[t for t, _ in trace.of("colocated", "decide")],
                                 trace=replayed, prompts=prompts)
  else:
    simulator.simulate_disagg(profile, prompt_lens, output_lens, arrivals,
                              replay=trace.entries, trace=replayed, prompts=prompts)
  recorded, simulated = trace.decisions(), replayed.decisions()
  assert recorded.keys() == simulated.keys()
  for name in recorded:
    for k, (want, got) in enumerate(zip(recorded[name], simulated[name])):
      assert got == want, f"{name} decision {k} differs: engine {want}, simulator {got}"
    assert len(simulated[name]) == len(recorded[name])
  preempted = sum(len(p[-1]) for decisions in recorded.values() for p in decisions
                  if isinstance(p[-1], tuple))
  cached = [o.metrics.cached_tokens for o in outputs]
  if shared:  # whole pages of the shared prefix, once its first prompt has computed them
    assert max(cached) == shared // config.page_size * config.page_size
    assert sum(c > 0 for c in cached) >= n // 2
  else:
    assert not any(cached)
  if num_pages is not None:
    assert preempted > 0
    assert sum(o.metrics.preemptions for o in outputs) == preempted
  else:
    assert preempted == 0
