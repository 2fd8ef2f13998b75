"""Attention kernel benchmark: our Pallas kernels beside cuDNN and XLA, measured in the same run.

    python launch/bench_kernels.py --output_json=kernels.json            # on a GPU (or TPU)
    python launch/bench_kernels.py --sweep                                # plus batch x context
    python launch/bench_kernels.py --smoke                                # tiny shapes, CPU

Prefill reports TFLOP/s of causal attention (4·B·Hq·S²·D / 2 FLOPs); decode reports KV bytes read
per second (2·B·ctx·Hkv·D·bytes). Baselines: `jax.nn.dot_product_attention` with
implementation="cudnn" and "xla" on dense K/V of the same shape, and our own XLA paged reference.
Each figure is the median of --iters timed calls after --warmup calls.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_string("output_json", None, "Write the results here (one JSON object).")
flags.DEFINE_bool("sweep", False, "Also sweep batch and context (decode) and length (prefill).")
flags.DEFINE_bool("smoke", False, "Tiny shapes in interpret mode: checks the script on CPU.")
flags.DEFINE_integer("iters", 20, "Timed calls per measurement.")
flags.DEFINE_integer("warmup", 3, "Untimed calls before timing.")
FLAGS = flags.FLAGS


def _time(fn, *args):
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(FLAGS.warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _measure(name, fn, args, work, unit):
  """Times fn(*args); `work` (FLOPs or bytes) / time gives the figure, reported in T`unit`/s."""
  try:
    seconds = _time(fn, *args)
  except Exception as e:  # a baseline missing on this backend is reported, not fatal
    return {"impl": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
  return {"impl": name, "ms": seconds * 1e3, f"T{unit}_per_s": work / seconds / 1e12}


def bench_prefill(b, s, hq, hkv, d, dtype, interpret):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pallas_kernels import kernels  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (b, s, hq, d), dtype)
  k = jax.random.normal(keys[1], (b, s, hkv, d), dtype)
  v = jax.random.normal(keys[2], (b, s, hkv, d), dtype)
  lengths = jnp.full((b,), s, jnp.int32)
  flops = 4 * b * hq * s * s * d / 2
  ours = jax.jit(lambda q, k, v, l: kernels.prefill_attention(q, k, v, l, interpret=interpret))
  results = [_measure("pallas", ours, (q, k, v, lengths), flops, "FLOP")]
  for impl in ("cudnn", "xla"):
    fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl))
    results.append(_measure(impl, fn, (q, k, v), flops, "FLOP"))
  return {"kernel": "prefill", "batch": b, "seq": s, "hq": hq, "hkv": hkv, "head_dim": d,
          "results": results}


def bench_decode(b, ctx, hq, hkv, d, page_size, dtype, interpret):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pallas_kernels import kernels, reference  # pylint: disable=g-import-not-at-top
  pages_per_seq = ctx // page_size
  num_pages = b * pages_per_seq
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = jax.random.normal(keys[0], (b, hq, d), dtype)
  k_pages = jax.random.normal(keys[1], (hkv, num_pages, page_size, d), dtype)
  v_pages = jax.random.normal(keys[2], (hkv, num_pages, page_size, d), dtype)
  # A shuffled page table, as a long-running server's would be.
  table = jnp.asarray(np.random.default_rng(0).permutation(num_pages).reshape(b, pages_per_seq),
                      jnp.int32)
  lengths = jnp.full((b,), ctx, jnp.int32)
  kv_bytes = 2 * b * ctx * hkv * d * jnp.dtype(dtype).itemsize
  ours = jax.jit(lambda *a: kernels.paged_decode_attention(*a, interpret=interpret))
  paged_args = (q, k_pages, v_pages, lengths, table)
  results = [_measure("pallas_paged", ours, paged_args, kv_bytes, "B"),
             _measure("xla_paged", jax.jit(reference.paged_decode_attention), paged_args,
                      kv_bytes, "B")]
  dense_k = k_pages[:, table].reshape(hkv, b, ctx, d).transpose(1, 2, 0, 3)
  dense_v = v_pages[:, table].reshape(hkv, b, ctx, d).transpose(1, 2, 0, 3)
  for impl in ("cudnn", "xla"):
    fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q[:, None], k, v, implementation=impl))
    results.append(_measure(f"{impl}_dense", fn, (q, dense_k, dense_v), kv_bytes, "B"))
  return {"kernel": "decode", "batch": b, "context": ctx, "hq": hq, "hkv": hkv, "head_dim": d,
          "page_size": page_size, "results": results}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  interpret = jax.default_backend() == "cpu"
  if interpret and not FLAGS.smoke:
    print("no accelerator: pass --smoke to check the script with tiny shapes", file=sys.stderr)
    return 1
  dtype = jnp.bfloat16
  if FLAGS.smoke:
    prefill_shapes = [(1, 64, 4, 2, 64)]
    decode_shapes = [(2, 64, 4, 2, 64, 16)]
  else:
    prefill_shapes = [(4, 4096, 32, 8, 128)]
    decode_shapes = [(64, 4096, 32, 8, 128, 16)]
    if FLAGS.sweep:
      prefill_shapes += [(4, s, 32, 8, 128) for s in (1024, 2048, 8192)]
      decode_shapes += [(bs, c, 32, 8, 128, 16) for bs in (1, 8, 32, 128)
                        for c in (512, 2048, 8192)]
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": []}
  for shape in prefill_shapes:
    report["rows"].append(bench_prefill(*shape, dtype, interpret))
    print(json.dumps(report["rows"][-1]))
  for shape in decode_shapes:
    report["rows"].append(bench_decode(*shape, dtype, interpret))
    print(json.dumps(report["rows"][-1]))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  app.run(main)
