#!/usr/bin/env bash
# On one GPU (the device machine or your own): a trainer smoke test (compile, eval, sample, checkpoint,
# resume) and the end-to-end throughput table. Data and a 32768-token tokenizer are expected under
# $NANOCHAT_BASE_DIR (default .gpu_base: `python -m nanochat.dataset --default-corpus` and
# `python -m scripts.tok_train` make them). Usage:
#   bash benchmarks/gpu_train.sh "12 20" "dense sparse fp8 fp8_sparse" [extra bench_train flags]
set -uo pipefail
depths=${1:-"12 20"}
modes=${2:-"dense"}
shift 2 || true
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$PWD/.gpu_base}
OUT=${OUT:-benchmarks/results}
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cusparselt', torch.backends.cusparselt.version())"
python3 -m nanochat.dataset --default-corpus
smoke="--depth 4 --device-batch-size 8 --max-seq-len 512 --total-batch-size 8192 --num-iterations 20 --eval-every 10 --eval-tokens 16384 --sample-every 20 --model-tag gpu_smoke"
python3 -m scripts.base_train $smoke --save-every 10 --overwrite 2>&1 | tee $OUT/smoke_full.log | grep -E "step 000(1[1-9]|20)/|val bpb|error|Error" | tail -12
python3 -m scripts.base_train $smoke --resume-from-step 10 2>&1 | tee $OUT/smoke_resume.log | grep -E "step 000(1[1-9]|20)/|val bpb|resumed|error|Error" | tail -12
python3 -m benchmarks.bench_train --depths $depths --modes $modes --out $OUT/train_bench "$@"
