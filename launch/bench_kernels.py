"""Attention kernel benchmark: our Pallas kernels beside cuDNN and XLA, measured in the same run.

    python launch/bench_kernels.py --output_json=kernels.json            # on a GPU (or TPU)
    python launch/bench_kernels.py --tune --sweep --time_budget_s=420    # block-size search too
    python launch/bench_kernels.py --smoke                                # tiny shapes, CPU

Prefill reports TFLOP/s of causal attention (4·B·Hq·S²·D / 2 FLOPs); decode reports KV bytes read
per second (2·B·ctx·Hkv·D·bytes). Baselines: `jax.nn.dot_product_attention` with
implementation="cudnn" and "xla" on dense K/V of the same shape, our own XLA paged reference and,
on GPUs, the paged kernel shipped with JAX (`jax.experimental.pallas.ops.gpu.paged_attention`).
The device's read bandwidth (a bf16 sum over 2 GiB) is measured in the same run, so decode is also
reported as a fraction of it. Each figure is the median of --iters timed calls after --warmup.

--tune times every block configuration of `PREFILL_GRID` / `DECODE_GRID` on the two headline
shapes and reports the best beside the defaults of `pallas_kernels/tuning.py` (where the winners
are kept). --time_budget_s stops starting new measurements once spent, so a leased machine's time
is never overrun; what was measured is still written.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from absl import app, flags

flags.DEFINE_string("output_json", None, "Write the results here (one JSON object).")
flags.DEFINE_bool("sweep", False, "Also sweep batch and context (decode) and length (prefill).")
flags.DEFINE_bool("tune", False, "Search block sizes, warps and stages on the headline shapes.")
flags.DEFINE_bool("smoke", False, "Tiny shapes in interpret mode: checks the script on CPU.")
flags.DEFINE_integer("iters", 20, "Timed calls per measurement.")
flags.DEFINE_integer("warmup", 3, "Untimed calls before timing.")
flags.DEFINE_float("time_budget_s", 0.0, "Start no new measurement after this many seconds; 0: none.")
FLAGS = flags.FLAGS

# (block_q, block_k, num_warps, num_stages) for prefill; (pages_per_block, num_splits, num_warps,
# num_stages) for decode. Ordered so the likeliest winners come first under a time budget.
PREFILL_GRID = [(bq, bk, w, st) for bq, bk in ((128, 64), (128, 128), (64, 64), (128, 32),
                                                (64, 128), (64, 32))
                for w in (8, 4) for st in (3, 2, 4)]
DECODE_GRID = [(ppb, sp, w, st) for ppb in (8, 16, 4) for sp in (1, 2, 4) for w in (4, 8)
               for st in (3, 2, 4)]

_START = time.perf_counter()


class OutOfTime(Exception):
  pass


def _check_budget():
  if FLAGS.time_budget_s and time.perf_counter() - _START > FLAGS.time_budget_s:
    raise OutOfTime(f"time budget of {FLAGS.time_budget_s:.0f} s spent")


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


def _measure(name, fn, args, work, unit, **extra):
  """Times fn(*args); `work` (FLOPs or bytes) / time gives the figure, reported in T`unit`/s."""
  _check_budget()
  try:
    seconds = _time(fn, *args)
  except Exception as e:  # a baseline missing on this backend is reported, not fatal
    return {"impl": name, **extra,
            "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
  return {"impl": name, **extra, "ms": seconds * 1e3, f"T{unit}_per_s": work / seconds / 1e12}


def measure_read_bandwidth():
  """Bytes read per second by a bf16 sum over 2 GiB of random data (the decode ceiling)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(7), (1 << 30,), jnp.bfloat16)
  fn = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
  return _measure("read_bandwidth", fn, (x,), x.size * 2, "B")


def bench_prefill(b, s, hq, hkv, d, dtype, interpret, tune=False):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pallas_kernels import kernels, tuning  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = jax.random.normal(keys[0], (b, s, hq, d), dtype)
  k = jax.random.normal(keys[1], (b, s, hkv, d), dtype)
  v = jax.random.normal(keys[2], (b, s, hkv, d), dtype)
  lengths = jnp.full((b,), s, jnp.int32)
  flops = 4 * b * hq * s * s * d / 2

  def ours(blocks):
    return jax.jit(lambda q, k, v, l: kernels.prefill_attention(q, k, v, l, interpret=interpret,
                                                                blocks=blocks))

  default = tuning.prefill_blocks(s, d, hq // hkv, kernels.default_backend())
  results = [_measure("pallas", ours(None), (q, k, v, lengths), flops, "FLOP",
                      blocks=list(_fields(default)))]
  for impl in ("cudnn", "xla"):
    fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl))
    results.append(_measure(impl, fn, (q, k, v), flops, "FLOP"))
  tuned = []
  if tune:
    for config in PREFILL_GRID:
      if config[0] > s or config[1] > s:
        continue
      try:
        tuned.append(_measure("pallas", ours(tuning.PrefillBlocks(*config)), (q, k, v, lengths),
                              flops, "FLOP", blocks=list(config)))
      except OutOfTime:
        break
  return {"kernel": "prefill", "batch": b, "seq": s, "hq": hq, "hkv": hkv, "head_dim": d,
          "results": results + _best(tuned, "TFLOP_per_s"), "tuning": tuned}


def bench_decode(b, ctx, hq, hkv, d, page_size, dtype, interpret, tune=False):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from pallas_kernels import kernels, reference, tuning  # pylint: disable=g-import-not-at-top
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
  paged_args = (q, k_pages, v_pages, lengths, table)

  def ours(blocks):
    return jax.jit(lambda *a: kernels.paged_decode_attention(*a, interpret=interpret,
                                                             blocks=blocks))

  default = tuning.paged_blocks(page_size, pages_per_seq, b * hkv, kernels.default_backend())
  results = [_measure("pallas_paged", ours(None), paged_args, kv_bytes, "B",
                      blocks=list(_fields(default))),
             _measure("xla_paged", jax.jit(reference.paged_decode_attention), paged_args,
                      kv_bytes, "B")]
  if not interpret and jax.default_backend() == "gpu":
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged  # pylint: disable=g-import-not-at-top
    fn = jax.jit(lambda q, k, v, l, t: jax_paged.paged_attention(q, k, v, t, l))
    results.append(_measure("jax_pallas_paged", fn, paged_args, kv_bytes, "B"))
  dense_k = k_pages[:, table].reshape(hkv, b, ctx, d).transpose(1, 2, 0, 3)
  dense_v = v_pages[:, table].reshape(hkv, b, ctx, d).transpose(1, 2, 0, 3)
  for impl in ("cudnn", "xla"):
    fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q[:, None], k, v, implementation=impl))
    results.append(_measure(f"{impl}_dense", fn, (q, dense_k, dense_v), kv_bytes, "B"))
  del dense_k, dense_v
  tuned = []
  if tune:
    for config in DECODE_GRID:
      if config[0] > pages_per_seq:
        continue
      try:
        tuned.append(_measure("pallas_paged", ours(tuning.PagedBlocks(
            pages_per_block=config[0], num_splits=config[1], num_warps=config[2],
            num_stages=config[3])), paged_args,
                              kv_bytes, "B", blocks=list(config)))
      except OutOfTime:
        break
  return {"kernel": "decode", "batch": b, "context": ctx, "hq": hq, "hkv": hkv, "head_dim": d,
          "page_size": page_size, "results": results + _best(tuned, "TB_per_s"),
          "tuning": tuned}


def _fields(blocks):
  if hasattr(blocks, "block_k"):
    return blocks.block_q, blocks.block_k, blocks.num_warps, blocks.num_stages
  return blocks.pages_per_block, blocks.num_splits, blocks.num_warps, blocks.num_stages


def _best(tuned, key):
  ok = [r for r in tuned if key in r]
  if not ok:
    return []
  best = dict(max(ok, key=lambda r: r[key]))
  best["impl"] += "_best"
  return [best]


def _summary(report):
  lines = []
  if report.get("read_bandwidth"):
    lines.append(f"read bandwidth: {report['read_bandwidth'].get('TB_per_s', 0):.2f} TB/s")
  for row in report["rows"]:
    if row["kernel"] == "prefill":
      shape = f"prefill B{row['batch']} S{row['seq']} Hq{row['hq']} Hkv{row['hkv']} D{row['head_dim']}"
      key, unit = "TFLOP_per_s", "TFLOP/s"
    else:
      shape = (f"decode B{row['batch']} ctx{row['context']} Hq{row['hq']} Hkv{row['hkv']} "
               f"D{row['head_dim']} page{row['page_size']}")
      key, unit = "TB_per_s", "TB/s"
    cells = []
    for r in row["results"]:
      value = f"{r[key]:.3g}" if key in r else "error"
      cells.append(f"{r['impl']}{r.get('blocks', '')}={value}")
    lines.append(f"{shape} [{unit}]: " + "  ".join(cells))
  return "\n".join(lines)


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
  sweep_prefill, sweep_decode = [], []
  if FLAGS.sweep and not FLAGS.smoke:
    sweep_prefill = [(4, s, 32, 8, 128) for s in (1024, 2048, 8192)]
    sweep_decode = [(bs, c, 32, 8, 128, 16) for bs in (1, 8, 32, 128) for c in (512, 2048, 8192)]
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d"), "rows": []}
  if not interpret:
    report["read_bandwidth"] = measure_read_bandwidth()
  planned = ([(bench_prefill, s, FLAGS.tune) for s in prefill_shapes]
             + [(bench_decode, s, FLAGS.tune) for s in decode_shapes]
             + [(bench_prefill, s, False) for s in sweep_prefill]
             + [(bench_decode, s, False) for s in sweep_decode])
  for bench, shape, tune in planned:
    try:
      row = bench(*shape, dtype, interpret, tune=tune)
    except OutOfTime as e:
      report["stopped"] = f"{e}; skipped {bench.__name__}{shape} and what followed"
      print(report["stopped"], file=sys.stderr)
      break
    report["rows"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "tuning"}), flush=True)
    if FLAGS.output_json:  # written as it goes: a run cut short keeps what it measured
      with open(FLAGS.output_json, "w") as f:
        json.dump(report, f, indent=1)
  print(_summary(report))
  return 0


if __name__ == "__main__":
  app.run(main)
