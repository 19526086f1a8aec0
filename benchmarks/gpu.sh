#!/usr/bin/env bash
# The one launcher for work on a GPU machine, by named stage; extra arguments go to the stage's script.
#   bash benchmarks/gpu.sh tests [pytest args]       GPU tests: sparse (cuSPARSELt, compressor, CUDA graphs) and fp8
#   bash benchmarks/gpu.sh mlp [bench_mlp args]      one MLP fwd+bwd, dense vs 2:4, compiled
#   bash benchmarks/gpu.sh mlp_fp8 [args]            the same for the fp8 variants
#   bash benchmarks/gpu.sh train [bench_train args]  trainer tokens/s per depth x mode
#   bash benchmarks/gpu.sh parity [bench_parity args]  paired val-bpb runs (corpus: stdlib + site-packages)
#   bash benchmarks/gpu.sh fp8_ops [bench_fp8_ops args]  one fp8 2:4 layer's GEMMs (CUTLASS, cuBLAS, cuSPARSELt) and re-pack
#   bash benchmarks/gpu.sh memory [bench_memory args]  peak memory per mode
#   bash benchmarks/gpu.sh profile [profile_step args]  where a step's GPU time goes, per mode
#   bash benchmarks/gpu.sh optim NPROC [bench_optim args]  the optimizer's share of a 1-micro-batch step, Muon variants
#   bash benchmarks/gpu.sh ddp NPROC NAME [base_train flags]  the trainer on NPROC GPUs (torchrun if > 1), log in $OUT/NAME.log,
#                                                    step events in $OUT/NAME.events.jsonl
#   bash benchmarks/gpu.sh parallel "STAGE ARGS [; STAGE ARGS]" ...  one quoted list of stages per GPU, run at once
#                                                    (GPU i runs the i-th list in order, or the GPUs a list names
#                                                    first as "@2,3 STAGE ..."; logs in $OUT/parallel_gpu<i>.log)
#   bash benchmarks/gpu.sh resume NPROC [resume_check args] -- [base_train flags]  kill -9 of the launcher mid-run,
#                                                    resume, compare with the unbroken run (issue 13); $OUT/resume_*
#   bash benchmarks/gpu.sh smi SECONDS               SM clock, power and temperature of every GPU every 0.5 s, in $OUT/smi.csv
#   bash benchmarks/gpu.sh env                       the set-up alone
#   bash benchmarks/gpu.sh smoke                     d4 train, save, resume
# The GPU machine has no package registry: carry .whl (../shared/gpu/wheels.sh: torchao, rustbpe,
# nvmath-python) and .gpu_base (NANOCHAT_BASE_DIR=.gpu_base python -m nanochat.dataset --default-corpus
# && python -m scripts.tok_train). Results and logs go to $OUT: default out/ (git-ignored); to record a result,
# OUT=benchmarks/results and keep only the files a claim rests on (benchmarks/results/README.md).
set -uo pipefail
stage=${1:?usage: gpu.sh tests|mlp|mlp_fp8|train|fp8_ops|parity|memory|profile|optim|ddp|resume|parallel|smi|env|smoke [args]}
shift
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-$PWD/.gpu_base}
python3 - <<'PY'
import torch
from nanochat.accel.sparse.cusparselt import pick_impl
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| cuSPARSELt", torch.backends.cusparselt.version(),
      "| 2:4 GEMMs via", pick_impl()[0])
PY
larger_corpus() {
  # a larger corpus than the stdlib alone (site-packages' .py files, ~33M tokens), in its own base dir;
  # the tokenizer is the carried one. Built under a lock: parallel lists may ask for it at once.
  export NANOCHAT_BASE_DIR=/tmp/parity_base
  mkdir -p $NANOCHAT_BASE_DIR
  (
    command -v flock > /dev/null && flock 9
    [ -d $NANOCHAT_BASE_DIR/tokenizer ] || cp -r .gpu_base/tokenizer $NANOCHAT_BASE_DIR/
    python3 -m nanochat.dataset --default-corpus --source-dir "$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
  ) 9> /tmp/parity_base.lock
}
case $stage in
  tests)
    [ $# -gt 0 ] || set -- tests/test_sparse_gpu.py tests/test_fp8_gpu.py tests/test_sparse.py
    log="$OUT/gpu_tests.log"; n=1; while [ -e "$log" ]; do n=$((n + 1)); log="$OUT/gpu_tests_$n.log"; done
    python3 -m pytest -s -rfEs --tb=short -p no:cacheprovider "$@" > "$log" 2>&1
    rc=$?
    grep -E "^(FAILED|ERROR)|^E  |passed|failed" "$log" | head -40
    exit $rc ;;
  mlp) python3 -m benchmarks.bench_mlp --out "$OUT" "$@" 2>&1 | tee "$OUT/mlp_bench.log" ;;
  mlp_fp8) python3 -m benchmarks.bench_mlp_fp8 --out "$OUT" "$@" 2>&1 | tee "$OUT/mlp_fp8_bench.log" | grep -v "^d=" ;;
  train)  # --out defaults to $OUT/train_bench; bench_train writes <out>.json/.md/.png and one <out>_children.log
    case " $* " in *" --out "*) ;; *) set -- --out "$OUT/train_bench" "$@" ;; esac
    python3 -m benchmarks.bench_train "$@" 2>&1 | tee -a "$OUT/train_bench.log" ;;
  fp8_ops) python3 -m benchmarks.bench_fp8_ops --out "$OUT" "$@" 2>&1 | tee -a "$OUT/fp8_ops_bench.log" ;;
  memory) python3 -m benchmarks.bench_memory --out "$OUT/memory" "$@" 2>&1 | tee -a "$OUT/memory_bench.log" ;;
  profile) python3 -m benchmarks.profile_step --out "$OUT" "$@" 2>&1 | tee -a "$OUT/profile.log" | grep -vE "^  " ;;
  parity)
    larger_corpus
    python3 -m benchmarks.bench_parity "$@" 2>&1 | tee -a "$OUT/parity.log" ;;
  optim)
    nproc=$1; shift
    if [ "$nproc" = 1 ]; then launch="python3"; else launch="torchrun --standalone --nproc_per_node=$nproc"; fi
    $launch -m benchmarks.bench_optim --out "$OUT" "$@" 2>&1 | tee -a "$OUT/optim_bench.log" ;;
  ddp)
    nproc=$1 name=$2; shift 2
    if [ "$nproc" = 1 ]; then launch="python3"; else launch="torchrun --standalone --nproc_per_node=$nproc"; fi
    $launch -m scripts.base_train -- --events "$OUT/$name.events.jsonl" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: rc $? | $(grep -E '^step [0-9]+/' "$OUT/$name.log" | tail -1 | cut -c1-150)" ;;
  parallel)  # independent 1-GPU stages side by side: a 2-GPU machine does two lists in the time of one
    i=0 pids=()
    for list in "$@"; do
      devs=$i  # a list starting "@2,3 " runs on those GPUs instead (a 2-GPU torchrun beside 1-GPU lists)
      if [[ $list == @* ]]; then devs=${list%% *}; devs=${devs#@}; list=${list#* }; fi
      ( IFS=';' read -ra stages <<< "$list"
        for st in "${stages[@]}"; do echo "== GPU $devs: $st ($(date -u +%T))"; CUDA_VISIBLE_DEVICES=$devs bash "$0" $st; done
        echo "== GPU $devs: done ($(date -u +%T))"
      ) > "$OUT/parallel_gpu$i.log" 2>&1 &
      pids+=($!); i=$((i + 1))
    done
    rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done
    for ((j = 0; j < i; j++)); do echo "---- GPU $j"; grep -vE "^step [0-9]+/|^  " "$OUT/parallel_gpu$j.log" | tail -n 40; done
    exit $rc ;;
  resume)  # the trainer's step lines and events go to the per-run files beside the results
    nproc=$1; shift
    python3 -m benchmarks.resume_check --nproc "$nproc" --out "$OUT/resume_{device}_g{nproc}_d{depth}_{mode}" "$@" 2>&1 \
      | tee -a "$OUT/resume_check.log" ;;
  smi)  # in the background beside other stages: "bash benchmarks/gpu.sh smi 500 &"
    timeout "${1:-600}" nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,power.limit,temperature.gpu,utilization.gpu \
      --format=csv -lms 500 > "$OUT/smi.csv" 2>&1 || true ;;
  env) ;;  # the set-up above only (wheels installed, versions printed)
  smoke)
    smoke="--depth 4 --device-batch-size 8 --max-seq-len 512 --total-batch-size 8192 --num-iterations 20 --eval-every 10 --eval-tokens 16384 --sample-every 20 --model-tag gpu_smoke"
    python3 -m scripts.base_train $smoke --save-every 10 2>&1 | tee "$OUT/smoke_full.log" | grep -E "step 000(1[1-9]|20)/|val bpb|error|Error" | tail -12
    python3 -m scripts.base_train $smoke --resume-from-step 10 2>&1 | tee "$OUT/smoke_resume.log" | grep -E "step 000(1[1-9]|20)/|val bpb|resumed|error|Error" | tail -12 ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
