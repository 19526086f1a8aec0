"""benchmarks/bench_mlp.py's conversion on CPU with a fake cuSPARSELt (tests/test_kernel_choice.py): it measures
the per-op choice, so the whole-step gate never runs, and its kernel columns read the masked kernel that a
conversion where no op pays leaves."""

import pytest

from benchmarks import bench_mlp
from nanochat.accel.kernel_choice import TimingCache
from nanochat.accel.sparse import DENSE
from tests.test_kernel_choice import FakeRuntime, fake_tuning


@pytest.mark.parametrize("dense_ms,kernel,algs", [(0.30, "cusparselt", (17, 17)), (0.184, "masked", (DENSE, DENSE))],
                         ids=["2:4 pays", "no op pays"])
def test_convert_skips_the_gate_and_reads_either_kernel(monkeypatch, dense_ms, kernel, algs):
    import nanochat.accel.sparse.convert as convert
    fake_tuning(monkeypatch, dense_ms=dense_ms)
    monkeypatch.setattr(convert, "sparse_step_pays", lambda *a: pytest.fail("bench_mlp times the per-op choice only"))
    monkeypatch.setattr(convert, "SparseRuntime", lambda device: FakeRuntime())
    monkeypatch.setattr(bench_mlp, "default_timing_cache", lambda log: TimingCache())
    mlp = bench_mlp.MLP(64)
    bench_mlp.convert(mlp, 256)
    for layer in (mlp.c_fc, mlp.c_proj):
        assert layer.kernel.name == kernel and bench_mlp.op_algs(layer) == algs
