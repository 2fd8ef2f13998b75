#!/usr/bin/env bash
# Everything the kernels need checked and timed on one leased NVIDIA GPU, in one go (~10 minutes;
# on an H200 the tests took 3 min, the benchmark 4 and each float32 generate.py over 1.5):
#   1. the compiled-kernel tests (`pytest -m gpu`) against the pure-JAX references,
#   2. launch/bench_kernels.py --tune --sweep (our kernels beside cuDNN, XLA and JAX's own paged
#      kernel, plus the card's read bandwidth, in the same run),
#   3. generate.py on the demo model with --attention_impl=pallas and xla, compared token by token
#      (float32 with full-precision dots everywhere, so the two differ only in summation order).
# Results land in $OUT (default /tmp/gpu_check). Usage: bash launch/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv \
  | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

echo "== compiled kernel tests"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_kernels.py \
  > "$OUT/gpu_tests.txt" 2>&1
tail -25 "$OUT/gpu_tests.txt"

echo "== kernel benchmark"
timeout "${BENCH_TIMEOUT_S:-330}" python3 launch/bench_kernels.py --tune --sweep \
  --time_budget_s="${BENCH_BUDGET_S:-280}" --output_json="$OUT/kernels.json" \
  > "$OUT/bench.txt" 2>&1
grep -v '^{' "$OUT/bench.txt" | grep -v -E '^[IW][0-9]{4} ' | tail -30

echo "== generate.py, pallas vs xla"
for impl in xla pallas; do
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 python3 launch/generate.py --mode=colocated \
    --dtype="${GENERATE_DTYPE:-float32}" --max_new_tokens=48 \
    --attention_impl=$impl --output_file="$OUT/generate_$impl.jsonl" > "$OUT/generate_$impl.log" 2>&1 \
    || tail -5 "$OUT/generate_$impl.log"
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
try:
  rows = {impl: [json.loads(l) for l in open(f"{out}/generate_{impl}.jsonl")] for impl in ("xla", "pallas")}
except OSError as e:
  sys.exit(f"generate comparison: {e}")
same = sum(a["output_token_ids"] == b["output_token_ids"] for a, b in zip(rows["xla"], rows["pallas"]))
print(f"generate: {same}/{len(rows['xla'])} prompts give identical greedy tokens (pallas vs xla)")
for a, b in zip(rows["xla"], rows["pallas"]):
  n = next((i for i, (x, y) in enumerate(zip(a["output_token_ids"], b["output_token_ids"])) if x != y), None)
  print("  first difference at token", n)
PY
