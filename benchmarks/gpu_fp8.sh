#!/usr/bin/env bash
# Everything the fp8 path needs on the GPU machine, in one call:
#   bash benchmarks/gpu_fp8.sh [test|bench|all|profile] [bench args...]
# Installs the carried torchao wheel (.whl), runs the GPU tests, runs the benchmark, copies
# results to $OUT (when set) and prints the table last.
set -u
MODE=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/torchao-*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader
python3 - <<'PY'
import torch, torchao, torchao.ops
print("torch", torch.__version__, "torchao", torchao.__version__, "cap", torch.cuda.get_device_capability())
from nanochat.fp8 import fp8_supported, fp8_sparse_supported
print("fp8_supported", fp8_supported("cuda"), "sparse", fp8_sparse_supported("cuda"))
PY
rc=0
if [ "$MODE" = test ] || [ "$MODE" = all ]; then
  python3 -m pytest -q -s tests/test_fp8_gpu.py 2>&1 | tee "$OUT/test_fp8_gpu.log" | grep -E "ERR|LOSSES|passed|failed|Error|skipped"
  rc=${PIPESTATUS[0]}
fi
if [ "$MODE" = bench ] || [ "$MODE" = all ]; then
  python3 -m benchmarks.bench_mlp_fp8 --out-dir "$OUT" "$@" 2>"$OUT/bench.err" | tee "$OUT/bench.log" | grep -v "^d=" 
  tail -5 "$OUT/bench.err"
fi
if [ "$MODE" = profile ]; then
  python3 -m benchmarks.bench_mlp_fp8 --out-dir "$OUT" --profile "$@" 2>"$OUT/profile.err" | grep -v "^d="
  tail -3 "$OUT/profile.err"
fi
exit $rc
