"""Engine overhead benchmarks, each a ratio of two things measured side by side in one run.

    python launch/bench_engine.py --num_cpu_devices=8 --output_json=engine.json

(a) decode throughput of the disaggregated engine against a bare loop of the same jitted decode
    step at the same batch (goal >= 0.9);
(b) KV bytes per second of one 2k-token request moved prefill mesh -> decode mesh against a plain
    device-to-device copy of the same number of bytes (goal >= 0.8), for matching TP degrees and
    for a resharding pair;
(c) decode step time while KV transfers are in flight against without (goal <= 1.1x): one
    2k-token transfer started with every decode step, and (the worst case) transfers back to back.
"""

from __future__ import annotations

import json
import queue
import statistics
import threading
import time

from absl import app, flags

flags.DEFINE_string("model_path", None, "Model directory; default: the demo model.")
flags.DEFINE_integer("num_cpu_devices", 8, "Simulated CPU devices (CPU only).")
flags.DEFINE_integer("prefill_tp", 4, "Prefill mesh size (= its TP).")
flags.DEFINE_integer("decode_tp", 4, "Decode mesh size (= its TP).")
flags.DEFINE_integer("reshard_tp", 2, "Decode TP of the resharding transfer in (b).")
flags.DEFINE_integer("decode_batch", 32, "Decode slots.")
flags.DEFINE_integer("max_seq_len", 512, "Engine max_seq_len.")
flags.DEFINE_integer("decode_tokens", 200, "Tokens each request decodes in (a).")
flags.DEFINE_integer("transfer_tokens", 2048, "Tokens of the request moved in (b) and (c).")
flags.DEFINE_integer("repeats", 20, "Repetitions of each timed measurement.")
flags.DEFINE_integer("rounds", 5, "Alternating engine / bare-loop rounds in (a).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Model dtype.")
flags.DEFINE_string("output_json", None, "Write the figures here.")
FLAGS = flags.FLAGS


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def engine_decode_throughput(prefill, decode):
  """(a) tokens/s of the engine's steady decode vs the bare jitted step at the same batch,
  alternated for --rounds rounds (this machine's speed drifts); medians of each."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine import buckets  # pylint: disable=g-import-not-at-top
  from disagg_jax.kv.pages import pages_for  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.sampling import SamplingArrays, SamplingParams  # pylint: disable=g-import-not-at-top
  batch, n = FLAGS.decode_batch, FLAGS.decode_tokens
  config = EngineConfig(max_seq_len=FLAGS.max_seq_len, decode_batch=batch, prefill_batch=4)
  prompt_len = 16
  prompts = [[3 + (i + j) % 200 for j in range(prompt_len)] for i in range(batch)]
  engine_runs, bare_runs = [], []
  with Engine.create("disagg", prefill, decode, config=config, progress=False) as engine:
    steps, core = engine.decode_steps, engine.core
    # The bare loop: the same compiled step, batch and page-table shape, tokens on device.
    pages_needed = pages_for(prompt_len + n, config.page_size)
    table = np.zeros((batch, buckets.pick(pages_needed, core.widths)), np.int32)
    table[:, :pages_needed] = 1 + np.arange(batch * pages_needed).reshape(batch, pages_needed)
    table = jax.device_put(table, steps.rows)
    sampling = jax.device_put(SamplingArrays.from_params([SamplingParams()] * batch, batch),
                              steps.rows)
    positions = np.full(batch, prompt_len, np.int32)

    all_rows = jax.device_put(np.arange(batch, dtype=np.int32), steps.rows)

    def bare_step(tokens, pages, i):
      tokens, pages, *_ = steps.decode(core.params, pages, tokens,
                                      jax.device_put(positions + i, steps.rows), table, sampling,
                                      all_rows)
      return tokens, pages

    for _ in range(FLAGS.rounds):
      outputs = engine.generate(prompts, SamplingParams(max_new_tokens=n, ignore_eos=True))
      # Steady state: from the moment the last request started decoding to the first finish.
      start = max(o.metrics.token_times[1] for o in outputs)
      end = min(o.metrics.token_times[-1] for o in outputs)
      emitted = sum(sum(1 for t in o.metrics.token_times if start < t <= end) for o in outputs)
      engine_runs.append(emitted / (end - start))

      tokens, pages = bare_step(core.tokens, core.kv_pages, 0)  # the engine is idle now
      jax.block_until_ready(tokens)
      t0 = time.perf_counter()
      for i in range(n):
        tokens, pages = bare_step(tokens, pages, i)
      jax.block_until_ready(tokens)
      bare_runs.append(batch * n / (time.perf_counter() - t0))
      core.tokens, core.kv_pages = tokens, pages
  engine_tps, bare_tps = statistics.median(engine_runs), statistics.median(bare_runs)
  return {"engine_tokens_per_s": engine_tps, "bare_loop_tokens_per_s": bare_tps,
          "ratio": engine_tps / bare_tps, "rounds": {"engine": engine_runs, "bare": bare_runs},
          "batch": batch, "goal": ">= 0.9"}


def _packed_request_kv(model, plan, tokens):
  """A `tokens`-long request's KV as the prefill side's extract step leaves it for `plan`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cfg = model.cfg
  shape = (cfg.num_layers, 2, tokens, cfg.num_kv_heads, cfg.head_dim)
  return jax.jit(lambda: plan.pack(jnp.ones(shape, model.dtype)),
                 out_shardings=plan.source_shardings)()


def kv_transfer_bandwidth(prefill, decode_meshes):
  """(b) bytes/s of moving a request's KV between meshes vs a plain device-to-device copy."""
  import jax  # pylint: disable=g-import-not-at-top
  from disagg_jax.transfer import TransferPlan  # pylint: disable=g-import-not-at-top
  cfg = prefill.cfg
  nbytes = (2 * cfg.num_layers * FLAGS.transfer_tokens * cfg.num_kv_heads * cfg.head_dim
            * jax.numpy.dtype(prefill.dtype).itemsize)
  src_dev, dst_dev = prefill.mesh.devices.flat[0], decode_meshes[0].devices.flat[0]
  plain = jax.device_put(jax.numpy.ones((nbytes // 4,), jax.numpy.float32), src_dev)
  candidates = {"plain": lambda: jax.device_put(plain, dst_dev)}
  plans = []
  for mesh in decode_meshes:
    plan = TransferPlan(cfg, prefill.mesh, mesh)
    packed = _packed_request_kv(prefill, plan, FLAGS.transfer_tokens)
    plans.append((mesh, plan))
    candidates[mesh.shape["tp"]] = lambda plan=plan, packed=packed: plan.transfer(packed)
  # Interleaved, after a warm-up, so allocator and machine noise hit every candidate alike.
  times = {name: [] for name in candidates}
  for rep in range(FLAGS.repeats * 5 + 3):
    for name, fn in candidates.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      if rep >= 3:
        times[name].append(time.perf_counter() - start)
  copy_s = statistics.median(times["plain"])
  out = {"bytes": nbytes, "plain_copy_GB_per_s": nbytes / copy_s / 1e9, "pairs": []}
  for mesh, _ in plans:
    seconds = statistics.median(times[mesh.shape["tp"]])
    out["pairs"].append({"prefill_tp": prefill.mesh.shape["tp"], "decode_tp": mesh.shape["tp"],
                         "GB_per_s": nbytes / seconds / 1e9, "ratio": copy_s / seconds,
                         "goal": ">= 0.8"})
  return out


def decode_with_transfers(prefill, decode):
  """(c) median decode step time with a transfer thread moving 2k-token KV meanwhile."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.sampling import SamplingArrays, SamplingParams  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.steps import ModelSteps  # pylint: disable=g-import-not-at-top
  from disagg_jax.transfer import TransferPlan  # pylint: disable=g-import-not-at-top
  batch = FLAGS.decode_batch
  steps = ModelSteps(decode, page_size=16)
  pages_per_seq = FLAGS.max_seq_len // 16
  pages = steps.init_pages(batch * pages_per_seq + 1)
  table = 1 + np.arange(batch * pages_per_seq, dtype=np.int32).reshape(batch, pages_per_seq)
  table = jax.device_put(table, steps.rows)
  tokens = jax.device_put(np.zeros(batch, np.int32), steps.rows)
  sampling = SamplingArrays.from_params([SamplingParams()] * batch, batch)
  positions = np.full(batch, 64, np.int32)
  state = {"tokens": tokens, "pages": pages}
  all_rows = jax.device_put(np.arange(batch, dtype=np.int32), steps.rows)

  def step():
    state["tokens"], state["pages"], *_ = steps.decode(
        decode.params, state["pages"], state["tokens"], positions, table, sampling, all_rows)
    jax.block_until_ready(state["tokens"])

  step()
  quiet = _median_time(step, FLAGS.repeats * 3)
  plan = TransferPlan(decode.cfg, prefill.mesh, decode.mesh)
  packed = _packed_request_kv(prefill, plan, FLAGS.transfer_tokens)
  requests, stop = queue.Queue(), threading.Event()
  moved = [0]

  def transfers():  # the engine's transfer thread, fed either one request per step or flat out
    while not stop.is_set():
      if requests.get() is None:
        return
      jax.block_until_ready(plan.transfer(packed))
      moved[0] += 1

  thread = threading.Thread(target=transfers)
  thread.start()

  def step_with_one_transfer():
    requests.put(1)
    step()

  paced = _median_time(step_with_one_transfer, FLAGS.repeats * 3)
  for _ in range(100000):
    requests.put(1)
  flat_out = _median_time(step, FLAGS.repeats * 3)
  stop.set()
  with requests.mutex:
    requests.queue.clear()
  requests.put(None)
  thread.join()
  return {"step_ms_quiet": quiet * 1e3,
          "step_ms_one_transfer_per_step": paced * 1e3, "ratio": paced / quiet,
          "step_ms_transfers_back_to_back": flat_out * 1e3, "ratio_back_to_back": flat_out / quiet,
          "transfer_bytes": packed[0].size * packed[0].dtype.itemsize * len(packed),
          "transfers_during": moved[0], "goal": "<= 1.1"}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.num_cpu_devices:  # only affects the CPU backend
    jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  from disagg_jax import parallel  # pylint: disable=g-import-not-at-top
  from disagg_jax.models import loading  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  p, d = FLAGS.prefill_tp, FLAGS.decode_tp
  prefill = loading.load_model(FLAGS.model_path, parallel.make_mesh(devices[:p], p), FLAGS.dtype)
  decode = loading.load_model(FLAGS.model_path, parallel.make_mesh(devices[p:p + d], d),
                              FLAGS.dtype)
  reshard_mesh = parallel.make_mesh(devices[p:p + FLAGS.reshard_tp], FLAGS.reshard_tp)
  report = {"device": devices[0].device_kind, "num_devices": len(devices),
            "date": time.strftime("%Y-%m-%d"), "flags": {k: FLAGS[k].value for k in (
                "prefill_tp", "decode_tp", "reshard_tp", "decode_batch", "max_seq_len",
                "decode_tokens", "transfer_tokens", "dtype")}}
  report["a_decode_throughput"] = engine_decode_throughput(prefill, decode)
  print(json.dumps(report["a_decode_throughput"]))
  report["b_kv_transfer"] = kv_transfer_bandwidth(prefill, [decode.mesh, reshard_mesh])
  print(json.dumps(report["b_kv_transfer"]))
  report["c_decode_with_transfers"] = decode_with_transfers(prefill, decode)
  print(json.dumps(report["c_decode_with_transfers"]))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)
