#!/usr/bin/env bash
# Paired accuracy runs on one GPU, on a code corpus larger than the stdlib: the .py files of the
# machine's site-packages (so a few hundred steps stay within one epoch). Usage:
#   bash benchmarks/gpu_parity.sh "dense sparse" [extra bench_parity flags]
set -uo pipefail
modes=${1:-"dense sparse"}
shift || true
OUT=${OUT:-benchmarks/results}
source benchmarks/gpu_env.sh
export NANOCHAT_BASE_DIR=/tmp/parity_base
mkdir -p $NANOCHAT_BASE_DIR
[ -d $NANOCHAT_BASE_DIR/tokenizer ] || cp -r .gpu_base/tokenizer $NANOCHAT_BASE_DIR/  # 32768-token BPE trained on the stdlib
src=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
time python3 -m nanochat.dataset --default-corpus --source-dir "$src"
python3 -m benchmarks.bench_parity --modes $modes "$@"
