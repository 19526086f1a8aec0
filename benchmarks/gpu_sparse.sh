#!/bin/bash
# GPU validation and benchmark of nanochat/sparse.py, one device call:
#   PYTHONUNBUFFERED=1 bash benchmarks/gpu_sparse.sh [quick]
# GPU tests (pytest), CPU tests under this torch, then benchmarks/bench_mlp.py; results in $OUT.
set -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, 'cusparselt', torch.backends.cusparselt.version())"
python3 - <<'PY'
import torch, time
w = torch.randn(8192, 2048, device="cuda", dtype=torch.bfloat16)
from nanochat.sparse import transposable_mask
wm = torch.where(transposable_mask(w), w, 0)
c = torch._cslt_compress(wm); print("compressed", tuple(c.shape), c.dtype, "from", tuple(wm.shape))
for i in range(3):
    torch.cuda.synchronize(); t = time.perf_counter(); c = torch._cslt_compress(wm); t1 = time.perf_counter(); torch.cuda.synchronize()
    print(f"compress 8192x2048: host {1e3*(t1-t):.3f} ms, host+sync {1e3*(time.perf_counter()-t):.3f} ms")
PY
echo "== tests"
python3 -m pytest tests/test_sparse_gpu.py tests/test_sparse.py  -q -s -rfE --tb=short -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
echo "pytest exit $?"
tail -3 "$OUT/gpu_tests.log"
grep -E "^(FAILED|ERROR)|^E " "$OUT/gpu_tests.log" | head -40
grep "2:4 kernels for" "$OUT/gpu_tests.log" | sort -u | head -20
echo "== bench"
if [ "$1" = "quick" ]; then
  python3 -m benchmarks.bench_mlp --dims 768,2048 --tokens 32768 --out "$OUT" 2>&1 | tee "$OUT/bench.log"
else
  python3 -m benchmarks.bench_mlp --out "$OUT" 2>&1 | tee "$OUT/bench.log"
fi
