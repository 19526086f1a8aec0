#!/usr/bin/env bash
# The end-to-end measurements of benchmarks/results/ (issues #4, #5), in stages that each fit one
# 10-minute call on the lent GPU machine. Carry .whl (torchao, rustbpe) and .gpu_base (stdlib shards +
# 32768-token tokenizer: `python -m nanochat.dataset --default-corpus`, `python -m scripts.tok_train`).
#   bash benchmarks/gpu_e2e.sh d20       # throughput, d20, all four modes, + the fp8 GPU tests
#   bash benchmarks/gpu_e2e.sh parity    # paired val bpb: d12 dense vs sparse, d8 dense vs fp8 vs fp8+sparse
#   bash benchmarks/gpu_e2e.sh d12       # throughput, d12, all four modes, + d20 sparse again
#   bash benchmarks/gpu_e2e.sh d26       # throughput, d26 (device batch 8 on 80 GB), all four modes
#   bash benchmarks/gpu_e2e.sh parity_fp8  # the d8 fp8+sparse parity run alone
# Results go to $OUT (default benchmarks/results); every log is tee'd there, so a cut-off call keeps them.
set -uo pipefail
stage=${1:?usage: gpu_e2e.sh d20|parity|d12|d26|parity_fp8}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source benchmarks/gpu_env.sh
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$PWD/.gpu_base}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cusparselt', torch.backends.cusparselt.version())"
case $stage in
  d20)
    python3 -m benchmarks.bench_train --depths 20 --modes dense sparse fp8 fp8_sparse --steps 16 --timeout 140 \
      --out "$OUT/train_bench_d20" 2>&1 | tee "$OUT/train_bench_d20.log"
    timeout 100 python3 -m pytest -q -x -p no:warnings tests/test_fp8_gpu.py 2>&1 | tee "$OUT/test_fp8_gpu.log" | tail -3
    ;;
  parity)
    OUT=$OUT bash benchmarks/gpu_parity.sh "dense sparse" --depth 12 --steps 250 --out "$OUT/parity_d12" 2>&1 | tee "$OUT/parity_d12.log"
    OUT=$OUT bash benchmarks/gpu_parity.sh "dense fp8 fp8_sparse" --depth 8 --steps 250 --out "$OUT/parity_fp8_d8" 2>&1 | tee "$OUT/parity_fp8_d8.log"
    ;;
  d12)
    export TORCH_LOGS=recompiles
    python3 -m benchmarks.bench_train --depths 12 --modes dense sparse fp8 fp8_sparse --steps 16 --timeout 150 \
      --out "$OUT/train_bench_d12" 2>&1 | tee "$OUT/train_bench_d12.log"
    python3 -m benchmarks.bench_train --depths 20 --modes sparse --steps 16 --timeout 150 \
      --out "$OUT/train_bench_d20_sparse" 2>&1 | tee "$OUT/train_bench_d20_sparse.log"
    ;;
  d26)
    # device batch 8 on 80 GB; each run is ~75 s of compilation + 14 steps of ~1 s
    python3 -m benchmarks.bench_train --depths 26 --device-batch-size 8 --modes dense sparse fp8_sparse fp8 --steps 14 \
      --timeout 120 --out "$OUT/train_bench_d26" 2>&1 | tee "$OUT/train_bench_d26.log"
    ;;
  parity_fp8)
    # the fp8+sparse run of the d8 parity set alone (same seed, data and steps as the parity stage's d8 runs)
    OUT=$OUT bash benchmarks/gpu_parity.sh "fp8_sparse" --depth 8 --steps 250 --out "$OUT/parity_fp8_d8_fp8_sparse" 2>&1 | tee "$OUT/parity_fp8_d8_fp8_sparse.log"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
