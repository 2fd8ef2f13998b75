"""Attention kernel benchmark: our Pallas kernels beside cuDNN and XLA, measured in the same run.

    python launch/bench_kernels.py --output_json=kernels.json            # on a GPU (or TPU)
    python launch/bench_kernels.py --tune --sweep --time_budget_s=420    # block-size search too
    python launch/bench_kernels.py --smoke                                # tiny shapes, CPU
    python launch/bench_kernels.py --tpu_plan --plan_batch=256 --plan_context=32768  # no device

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

--tpu_plan measures nothing: it prints, for the --plan_* shape, the grid steps, bytes per step,
SMEM and VMEM of the TPU paged decode kernels (the grid kernel `tpu_paged` and the ragged
`tpu_ragged`) and their modelled time per layer on v5e / v6e (`pallas_kernels/tpu_plan.py`:
0.35 us per grid step plus K/V bytes at 819 / 1640 GB/s). On a TPU, decode is timed for both
kernels (`pallas_paged` is the default, ragged; `pallas_grid` the grid kernel).
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
flags.DEFINE_integer("rounds", 3, "Headline shapes: interleaved rounds over all implementations.")
flags.DEFINE_float("time_budget_s", 0.0, "Start no new measurement after this many seconds; 0: none.")
flags.DEFINE_bool("tpu_plan", False, "Print the TPU decode kernels' plan (grid steps, bytes per "
                  "step, SMEM/VMEM, modelled v5e/v6e time per layer) for the --plan_* shape; no "
                  "device needed, nothing is run.")
flags.DEFINE_integer("plan_batch", 64, "--tpu_plan: sequences in the batch.")
flags.DEFINE_integer("plan_context", 8192, "--tpu_plan: tokens of context per sequence.")
flags.DEFINE_integer("plan_hq", 32, "--tpu_plan: query heads (Llama-3-8B: 32).")
flags.DEFINE_integer("plan_hkv", 8, "--tpu_plan: KV heads (Llama-3-8B: 8).")
flags.DEFINE_integer("plan_head_dim", 128, "--tpu_plan: head dimension.")
flags.DEFINE_integer("plan_page_size", 16, "--tpu_plan: tokens per KV page.")
flags.DEFINE_enum("plan_dtype", "bfloat16", ["bfloat16", "float32"], "--tpu_plan: K/V dtype.")
FLAGS = flags.FLAGS

# (block_q, block_k, num_warps, num_stages) for prefill; (pages_per_block, num_splits, num_warps,
# num_stages) for decode. Ordered so the likeliest winners come first under a time budget.
# The first H200 search (docs/BENCHMARKS.md) ruled out 128x128 tiles with 4 stages (over the 227 KB
# of shared memory) and found 4-warp, 64-token decode blocks best; the grids centre on the winners.
PREFILL_GRID = [(128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3),
                (128, 128, 8, 3), (128, 128, 8, 2), (128, 128, 4, 2), (128, 128, 4, 3),
                (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 8, 4), (128, 32, 4, 4), (64, 128, 4, 3),
                (256, 64, 8, 2), (256, 64, 8, 3)]
DECODE_GRID = [(ppb, sp, w, st) for ppb in (4, 2, 8) for sp in (2, 4, 1, 8) for w in (4, 2)
               for st in (3, 4, 5)]

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


def _measure(name, fn, args, work, unit, budgeted=True, **extra):
  """Times fn(*args); `work` (FLOPs or bytes) / time gives the figure, reported in T`unit`/s."""
  if budgeted:
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


def _compare(candidates, work, unit, rounds):
  """Measures each (name, fn, args, extra) `rounds` times, interleaved so clock and thermal drift
  falls on every implementation alike, and reports each one's median."""
  times, failed = {}, {}
  for round_index in range(rounds):
    if round_index and FLAGS.time_budget_s and time.perf_counter() - _START > FLAGS.time_budget_s:
      break  # the first round always runs: a headline row is never lost to the budget
    for name, fn, args, extra in candidates:
      if name in failed:
        continue
      result = _measure(name, fn, args, work, unit, budgeted=rounds == 1, **extra)
      if "error" in result:
        failed[name] = result
      else:
        times.setdefault(name, []).append(result["ms"])
  results = []
  for name, _, _, extra in candidates:
    if name in failed:
      results.append(failed[name])
      continue
    ms = statistics.median(times[name])
    results.append({"impl": name, **extra, "ms": ms, f"T{unit}_per_s": work / ms / 1e9,
                    "rounds": len(times[name])})
  return results


def _search(grid, make_blocks, fn_for, args, work, unit):
  """Times every configuration once (until the time budget is spent); returns all, and the best."""
  tuned = []
  for config in grid:
    try:
      tuned.append(_measure("pallas", fn_for(make_blocks(config)), args, work, unit,
                            blocks=list(config)))
    except OutOfTime:
      break
  ok = [r for r in tuned if "ms" in r]
  return tuned, (min(ok, key=lambda r: r["ms"])["blocks"] if ok else None)


def bench_prefill(b, s, hq, hkv, d, dtype, interpret, tune=False, rounds=1):
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

  default = list(_fields(tuning.prefill_blocks(s, d, hq // hkv, kernels.default_backend())))
  args = (q, k, v, lengths)
  candidates = [("pallas", ours(None), args, {"blocks": default})]
  tuned = []
  if tune:
    grid = [c for c in PREFILL_GRID if c[0] <= s and c[1] <= s]
    tuned, best = _search(grid, lambda c: tuning.PrefillBlocks(*c), ours, args, flops, "FLOP")
    if best is not None and best != default:
      candidates.append(("pallas_best", ours(tuning.PrefillBlocks(*best)), args,
                         {"blocks": best}))
  for impl in ("cudnn", "xla"):
    fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=impl))
    candidates.append((impl, fn, (q, k, v), {}))
  return {"kernel": "prefill", "batch": b, "seq": s, "hq": hq, "hkv": hkv, "head_dim": d,
          "results": _compare(candidates, flops, "FLOP", rounds), "tuning": tuned}


def bench_decode(b, ctx, hq, hkv, d, page_size, dtype, interpret, tune=False, rounds=1):
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

  def blocks_of(config):
    return tuning.PagedBlocks(pages_per_block=config[0], num_splits=config[1],
                              num_warps=config[2], num_stages=config[3])

  default = list(_fields(tuning.paged_blocks(page_size, pages_per_seq, b * hkv,
                                             kernels.default_backend())))
  candidates = [("pallas_paged", ours(None), paged_args, {"blocks": default})]
  tuned = []
  if tune:
    grid = [c for c in DECODE_GRID if c[0] <= pages_per_seq]
    tuned, best = _search(grid, blocks_of, ours, paged_args, kv_bytes, "B")
    if best is not None and best != default:
      candidates.append(("pallas_paged_best", ours(blocks_of(best)), paged_args,
                         {"blocks": best}))
  if not interpret and jax.default_backend() == "tpu":  # the earlier grid kernel, to compare
    grid = jax.jit(lambda *a: kernels.paged_decode_attention(*a, interpret=interpret,
                                                             tpu_kernel="grid"))
    candidates.append(("pallas_grid", grid, paged_args, {}))
  candidates.append(("xla_paged", jax.jit(reference.paged_decode_attention), paged_args, {}))
  if not interpret and jax.default_backend() == "gpu":
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged  # pylint: disable=g-import-not-at-top
    fn = jax.jit(lambda q, k, v, l, t: jax_paged.paged_attention(q, k, v, t, l))
    candidates.append(("jax_pallas_paged", fn, paged_args, {}))
  dense_k = k_pages[:, table].reshape(hkv, b, ctx, d).transpose(1, 2, 0, 3)
  dense_v = v_pages[:, table].reshape(hkv, b, ctx, d).transpose(1, 2, 0, 3)
  for impl in ("cudnn", "xla"):
    fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
        q[:, None], k, v, implementation=impl))
    candidates.append((f"{impl}_dense", fn, (q, dense_k, dense_v), {}))
  return {"kernel": "decode", "batch": b, "context": ctx, "hq": hq, "hkv": hkv, "head_dim": d,
          "page_size": page_size, "results": _compare(candidates, kv_bytes, "B", rounds),
          "tuning": tuned}


def _fields(blocks):
  if hasattr(blocks, "block_k"):
    return blocks.block_q, blocks.block_k, blocks.num_warps, blocks.num_stages
  return blocks.pages_per_block, blocks.num_splits, blocks.num_warps, blocks.num_stages


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
    ours = max((r[key] for r in row["results"] if r["impl"].startswith("pallas") and key in r),
               default=None)
    cudnn = next((r[key] for r in row["results"] if r["impl"].startswith("cudnn") and key in r),
                 None)
    if ours and cudnn:
      cells.append(f"ours/cudnn={ours / cudnn:.2f}")
    read = report.get("read_bandwidth", {}).get("TB_per_s")
    if ours and read and row["kernel"] == "decode":
      cells.append(f"ours/read_bw={ours / read:.2f}")
    lines.append(f"{shape} [{unit}]: " + "  ".join(cells))
  return "\n".join(lines)


def tpu_plan_table() -> str:
  from pallas_kernels import tpu_plan  # pylint: disable=g-import-not-at-top
  shape = tpu_plan.DecodeShape(batch=FLAGS.plan_batch, context=FLAGS.plan_context,
                               hq=FLAGS.plan_hq, hkv=FLAGS.plan_hkv,
                               head_dim=FLAGS.plan_head_dim, page_size=FLAGS.plan_page_size,
                               itemsize=2 if FLAGS.plan_dtype == "bfloat16" else 4)
  return tpu_plan.format_table(shape, FLAGS.plan_dtype)


def main(argv):
  del argv
  if FLAGS.tpu_plan:
    print(tpu_plan_table())
    return 0
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
  if not interpret:  # twice: the first also brings the clocks up
    report["read_bandwidth"] = max((measure_read_bandwidth() for _ in range(2)),
                                   key=lambda r: r.get("TB_per_s", 0))
  planned = ([(bench_prefill, s, FLAGS.tune, FLAGS.rounds) for s in prefill_shapes]
             + [(bench_decode, s, FLAGS.tune, FLAGS.rounds) for s in decode_shapes]
             + [(bench_prefill, s, False, 1) for s in sweep_prefill]
             + [(bench_decode, s, False, 1) for s in sweep_decode])
  for bench, shape, tune, rounds in planned:
    try:
      row = bench(*shape, dtype, interpret, tune=tune, rounds=rounds)
    except OutOfTime as e:
      report["stopped"] = f"{e}; skipped {bench.__name__}{shape} and what followed"
      print(report["stopped"], file=sys.stderr)
      break
    report["rows"].append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "tuning"}), flush=True)
    if FLAGS.output_json:  # written as it goes: a run cut short keeps what it measured
      with open(FLAGS.output_json, "w") as f:
        json.dump(report, f, indent=1)
  if not interpret:  # once more at the end; the best of the three is the ceiling
    report["read_bandwidth"] = max(report["read_bandwidth"], measure_read_bandwidth(),
                                   key=lambda r: r.get("TB_per_s", 0))
  if FLAGS.output_json:
    with open(FLAGS.output_json, "w") as f:
      json.dump(report, f, indent=1)
  print(_summary(report))
  return 0


if __name__ == "__main__":
  app.run(main)
