"""The engine at model scale, side by side in one run: the serving engine, a bare jitted decode loop
of the same compiled step, and Hugging Face transformers' `generate`, on the same prompts and batch
(greedy, outputs compared token for token).

    python launch/bench_model.py --model_config=smollm2_135m --batch=16 --max_new_tokens=64
    python launch/bench_model.py --model_path=/path/to/checkpoint --mode=disagg --num_cpu_devices=2

--model_config builds (once, cached) a random-weight checkpoint of a shape in configs/models with
transformers, so nothing is downloaded. Figures (tokens per second):
  transformers   `model.generate` on the batch, left-padded, float32, prefill included;
  engine         `Engine.generate` (or the static generator, --mode=single) on the same prompts,
                 prefill included (its first call, which compiles any shape it had not, is a
                 discarded warm-up), and its steady decode rate while every request decodes;
  bare loop      the engine's own compiled decode step called back to back at the same batch and
                 page-table width, tokens kept on device: what the engine's host work costs.
  matmul floor   the model's forward at that batch without attention, sampling or cache writes:
                 what the small-batch matmuls of XLA alone cost.
The ratios engine / bare loop and engine / transformers are the figures of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

# This directory holds launch/profile.py, which would shadow the standard library's `profile`
# (torch imports cProfile, which imports it): keep it off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_string("model_path", None, "A Hugging Face checkpoint directory.")
flags.DEFINE_string("model_config", "smollm2_135m",
                    "Without --model_path: a random-weight checkpoint of configs/models/NAME.py.")
flags.DEFINE_enum("mode", "colocated", ["single", "colocated", "disagg"], "The engine's mode.")
flags.DEFINE_integer("num_cpu_devices", 2, "Simulated CPU devices (disagg: prefill on the first, "
                     "decode on the second).")
flags.DEFINE_integer("batch", 16, "Prompts, and the decode batch.")
flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per prompt (EOS ignored).")
flags.DEFINE_integer("rounds", 3, "Timed rounds of each side (medians reported).")
flags.DEFINE_bool("transformers", True, "Run transformers' generate (needs torch).")
flags.DEFINE_string("compilation_cache_dir", "", "JAX's persistent compilation cache; 'none': off.")
flags.DEFINE_string("output_json", None, "Write the figures here.")
FLAGS = flags.FLAGS

CHAT_PROMPTS = (
    "User: What is the capital of France?\nAssistant:",
    "User: Write a haiku about the sea.\nAssistant:",
    "User: Explain recursion to a child.\nAssistant:",
    "User: How do I reverse a list in Python?\nAssistant:",
    "User: Give me three tips for better sleep.\nAssistant:",
    "User: What is the difference between a list and a tuple?\nAssistant:",
    "User: Summarize the plot of Hamlet in two sentences.\nAssistant:",
    "User: Translate 'good morning' into Spanish.\nAssistant:",
    "User: Why is the sky blue?\nAssistant:",
    "User: Suggest a name for a grey cat.\nAssistant:",
    "User: What does a compiler do?\nAssistant:",
    "User: List the planets of the solar system.\nAssistant:",
    "User: How many minutes are in a day?\nAssistant:",
    "User: Write a limerick about a programmer.\nAssistant:",
    "User: What is disaggregated inference?\nAssistant:",
    "User: Recommend a book about history.\nAssistant:",
)


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def _prompts(tokenizer, n):
  return [tokenizer.encode(CHAT_PROMPTS[i % len(CHAT_PROMPTS)] + " " * (i // len(CHAT_PROMPTS)))
          for i in range(n)]


def run_transformers(model_dir, prompts, max_new_tokens, rounds, pad_id):
  """tokens/s of transformers' greedy generate on the whole batch, and its outputs."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  width = max(len(p) for p in prompts)
  ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for i, p in enumerate(prompts):  # left padding, as generate expects
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1

  def generate(n):
    with torch.no_grad():
      return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                            min_new_tokens=n, do_sample=False, pad_token_id=pad_id)

  generate(2)  # warm-up
  times, out = [], None
  for _ in range(rounds):
    start = time.perf_counter()
    out = generate(max_new_tokens)
    times.append(time.perf_counter() - start)
  seconds = _median(times)
  outputs = [row[width:].tolist() for row in out]
  del model
  return {"tokens_per_s": len(prompts) * max_new_tokens / seconds, "seconds": seconds,
          "step_ms": seconds / max_new_tokens * 1e3, "threads": torch.get_num_threads()}, outputs


def _steady_decode_rate(outputs):
  """Tokens/s while every request decodes: from the last request's first decoded token to the
  first request's last token."""
  start = max(o.metrics.token_times[1] for o in outputs)
  end = min(o.metrics.token_times[-1] for o in outputs)
  if end <= start:
    return float("nan")
  emitted = sum(sum(1 for t in o.metrics.token_times if start < t <= end) for o in outputs)
  return emitted / (end - start)


def run_engine(generator, prompts, max_new_tokens, rounds):
  from disagg_jax.engine.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
  generator.generate(prompts, sampling)  # warm-up: compiles whatever it had not
  e2e, decode, outputs = [], [], None
  for _ in range(rounds):
    start = time.perf_counter()
    outputs = generator.generate(prompts, sampling)
    e2e.append(len(prompts) * max_new_tokens / (time.perf_counter() - start))
    if outputs[0].metrics is not None:
      decode.append(_steady_decode_rate(outputs))
  return {"tokens_per_s": _median(e2e), "decode_tokens_per_s": _median(decode),
          "rounds": e2e}, [o.output_token_ids for o in outputs]


def run_bare_loop(steps, params, kv_pages, batch, prompt_len, width, max_new_tokens, rounds):
  """The engine's compiled decode step back to back: no scheduling, no host reads but the end."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.sampling import SamplingArrays, SamplingParams  # pylint: disable=g-import-not-at-top
  ps = steps.page_size
  table = np.zeros((batch, width), np.int32)
  per_row = min(width, (kv_pages[0].k.shape[1] // steps.dp - 1) // (batch // steps.dp))
  for i in range(batch):  # each row's pages from its dp row's block, after the scratch page
    shard, local = divmod(i, batch // steps.dp)
    first = shard * (kv_pages[0].k.shape[1] // steps.dp) + 1 + local * per_row
    table[i, :per_row] = np.arange(first, first + per_row)
  tokens, positions, table, sampling, rows = steps.put_rows(
      np.zeros(batch, np.int32), np.full(batch, prompt_len, np.int32), table,
      SamplingArrays.from_params([SamplingParams()] * batch, batch),
      np.arange(batch, dtype=np.int32))
  position_steps = [steps.put_rows(np.full(batch, prompt_len + i, np.int32))[0]
                    for i in range(min(max_new_tokens, per_row * ps - prompt_len))]
  state = {"tokens": tokens, "pages": kv_pages}

  def loop():
    for pos in position_steps:
      state["tokens"], state["pages"], *_ = steps.decode(params, state["pages"], state["tokens"],
                                                     pos, table, sampling, rows)
    jax.block_until_ready(state["tokens"])

  loop()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    loop()
    times.append(time.perf_counter() - start)
  return {"tokens_per_s": batch * len(position_steps) / _median(times),
          "step_ms": _median(times) / len(position_steps) * 1e3, "width_pages": width}, state


def matmul_floor(model, batch, rounds):
  """ms of the model's forward at `batch` tokens without attention (q passes through), cache
  writes or sampling: the projections, MLP and logits alone, plus an argmax."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def no_attention(layer, q, k, v, cache):
    del layer, k, v
    return q, cache

  def forward(params, tokens):
    net = nnx.merge(model.graphdef, params)
    hidden, _ = net(tokens[:, None], jnp.zeros_like(tokens)[:, None], no_attention)
    return jnp.argmax(net.logits(hidden[:, 0]), axis=-1)

  fn = jax.jit(forward)
  tokens = jax.device_put(np.zeros(batch, np.int32), model.params["embedding"].sharding)
  jax.block_until_ready(fn(model.params, tokens))
  times = []
  for _ in range(max(rounds, 3) * 5):
    start = time.perf_counter()
    jax.block_until_ready(fn(model.params, tokens))
    times.append(time.perf_counter() - start)
  return _median(times) * 1e3


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
  from disagg_jax.engine import compiled  # pylint: disable=g-import-not-at-top
  compiled.enable_persistent_cache(FLAGS.compilation_cache_dir)
  from disagg_jax import parallel  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine import buckets  # pylint: disable=g-import-not-at-top
  from disagg_jax.kv.pages import pages_for  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.engine import Engine, EngineConfig  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.request import Limits  # pylint: disable=g-import-not-at-top
  from disagg_jax.engine.single import StaticGenerator  # pylint: disable=g-import-not-at-top
  from disagg_jax.models import loading  # pylint: disable=g-import-not-at-top
  from disagg_jax.testing import checkpoints  # pylint: disable=g-import-not-at-top

  model_dir = FLAGS.model_path or checkpoints.random_checkpoint(FLAGS.model_config)
  devices = jax.devices()
  model = loading.load_model(model_dir, parallel.make_mesh(devices[:1], 1))
  prompts = _prompts(model.tokenizer, FLAGS.batch)
  report = {"model": FLAGS.model_path or f"{FLAGS.model_config} (random weights)",
            "mode": FLAGS.mode, "batch": FLAGS.batch, "max_new_tokens": FLAGS.max_new_tokens,
            "prompt_tokens": [len(p) for p in prompts], "device": devices[0].device_kind,
            "num_devices": len(devices), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}
  expected = None
  if FLAGS.transformers:
    pad = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    report["transformers"], expected = run_transformers(model_dir, prompts,
                                                        FLAGS.max_new_tokens, FLAGS.rounds, pad)
    print("transformers", json.dumps(report["transformers"]), flush=True)

  config = EngineConfig(decode_batch=FLAGS.batch)
  if FLAGS.mode == "single":
    limits = Limits.for_model(model.cfg)
    generator = StaticGenerator(model, limits=limits, max_batch=FLAGS.batch)
    steps, params = generator.steps, model.params
  else:
    decode_model = (loading.load_model(model_dir, parallel.make_mesh(devices[1:2], 1))
                    if FLAGS.mode == "disagg" else None)
    generator = Engine.create(FLAGS.mode, model, decode_model, config)
    steps, params = generator.decode_steps, generator.core.params
  try:
    report["engine"], outputs = run_engine(generator, prompts, FLAGS.max_new_tokens,
                                           FLAGS.rounds)
    print("engine", json.dumps(report["engine"]), flush=True)
    total = max(len(p) for p in prompts) + FLAGS.max_new_tokens
    width = buckets.pick(pages_for(total, steps.page_size),
                         buckets.width_buckets(Limits.for_model(model.cfg).max_seq_len,
                                               steps.page_size))
    if FLAGS.mode == "single":
      pool = generator._kv_pages  # pylint: disable=protected-access
    else:
      pool = generator.core.kv_pages
    report["bare_loop"], state = run_bare_loop(
        steps, params, pool, FLAGS.batch, min(len(p) for p in prompts), width,
        FLAGS.max_new_tokens, FLAGS.rounds)
    if FLAGS.mode == "single":
      generator._kv_pages = state["pages"]  # pylint: disable=protected-access
    else:
      generator.core.kv_pages, generator.core.tokens = state["pages"], state["tokens"]
    print("bare loop", json.dumps(report["bare_loop"]), flush=True)
  finally:
    if hasattr(generator, "shutdown"):
      generator.shutdown()
  report["matmul_floor_step_ms"] = matmul_floor(model, FLAGS.batch, FLAGS.rounds)

  engine_rate = report["engine"]["decode_tokens_per_s"]
  if engine_rate != engine_rate:  # single mode: no per-token timestamps
    engine_rate = report["engine"]["tokens_per_s"]
  report["engine_vs_bare_loop"] = engine_rate / report["bare_loop"]["tokens_per_s"]
  if expected is not None:
    mismatched = [i for i, (a, b) in enumerate(zip(outputs, expected)) if a != b]
    report["greedy_equal"] = not mismatched
    report["mismatched_prompts"] = mismatched
    report["engine_vs_transformers"] = (report["engine"]["tokens_per_s"]
                                        / report["transformers"]["tokens_per_s"])
  summary = {k: report[k] for k in ("engine_vs_bare_loop", "engine_vs_transformers",
                                    "greedy_equal", "matmul_floor_step_ms") if k in report}
  print(json.dumps(summary))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)
  return 0 if report.get("greedy_equal", True) else 1


if __name__ == "__main__":
  sys.exit(app.run(main))
