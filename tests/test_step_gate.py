"""CPU tests of nanochat/accel/step_gate.py: the whole-step records that switch --sparse's 2:4 GEMMs on or off,
checked against the committed benchmark records, and the conversion's fallback to the masked kernel."""

import functools
import json
import os

import pytest

from nanochat.accel.step_gate import PAYS_ABOVE, STEP_RECORDS, StepRecord, sparse_step_pays
from tests.test_kernel_choice import FakeRuntime, fake_tuning, tiny_gpt

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
MODES = {"bf16": ("dense", "sparse"), "fp8": ("fp8", "fp8_sparse")}


@pytest.mark.parametrize("r", STEP_RECORDS, ids=lambda r: f"{r.record}-{r.precision}-mb{r.micro_batches}")
def test_every_row_is_its_records_measurement(r):
    """Each row's ratio, GPU and size are what its benchmarks/results JSON holds (depth x 64 = width)."""
    assert os.path.exists(os.path.join(RESULTS, f"{r.record}.md"))
    with open(os.path.join(RESULTS, f"{r.record}.json")) as f:
        data = json.load(f)
    assert data["meta"]["gpu"] == r.gpu
    base, sparse = MODES[r.precision]
    rows = {row["mode"]: row for row in data["rows"]
            if row["depth"] * 64 == r.width and row["micro_batches"] == r.micro_batches}
    assert rows[sparse]["tok_per_sec"] / rows[base]["tok_per_sec"] == pytest.approx(r.ratio, abs=6e-4)
    for res in data.get("results", []):
        info = res.get("info", {}).get(sparse)
        if info and info["micro_batches"] == r.micro_batches:
            assert info["tokens_per_step"] == r.tokens * r.micro_batches


def test_two_to_four_is_on_only_at_or_beyond_a_size_that_measured_it_faster():
    h200 = functools.partial(sparse_step_pays, "NVIDIA H200")
    assert h200("bf16", 1664, 32768, 4)[0]                 # d26, 4 micro-batches: 1.031x
    assert h200("bf16", 2048, 65536, 8)[0]                 # larger in every direction
    assert not h200("bf16", 1664, 32768, 1)[0]             # d26, 1 micro-batch: 1.001x
    assert not h200("bf16", 1280, 32768, 4)[0]             # d20: 1.009x
    assert not h200("bf16", 1664, 16384, 4)[0]             # fewer tokens per micro-batch than any record
    assert not h200("fp8", 1664, 32768, 4)[0]              # --fp8 --sparse: 0.991x of --fp8
    assert not sparse_step_pays("NVIDIA H100 80GB HBM3", "bf16", 1664, 32768, 4)[0]  # no record on this GPU
    pays, line = h200("bf16", 1664, 32768, 4)
    assert "1.031x" in line and "train_d26_mb4_process_h200.md" in line
    pays, line = h200("bf16", 1280, 32768, 1)
    assert "0.982x" in line and "--sparse-backend cusparselt" in line and "\n" not in line


def test_the_threshold_is_inclusive_and_above_noise():
    rec = (StepRecord("G", "bf16", 64, 256, 1, PAYS_ABOVE, "r"),)
    assert sparse_step_pays("G", "bf16", 64, 256, 1, rec)[0]
    rec = (StepRecord("G", "bf16", 64, 256, 1, PAYS_ABOVE - 0.001, "r"),)
    assert not sparse_step_pays("G", "bf16", 64, 256, 1, rec)[0]
    assert PAYS_ABOVE > 1.01


def test_auto_backend_trains_with_the_masked_kernel_where_no_record_pays(monkeypatch, tmp_path):
    """With a fake cuSPARSELt on CPU: no whole-step record at this size -> every layer on the masked kernel
    (no library kept), one line naming the way to force 2:4, and no GEMM timed; a record that pays -> timed and
    on cuSPARSELt; --sparse-backend cusparselt skips the gate."""
    import nanochat.accel.sparse.convert as convert
    from nanochat.accel.kernel_choice import TimingCache
    from nanochat.accel.sparse import SparseConfig, convert_mlp_to_sparse, sparse_layers
    calls = fake_tuning(monkeypatch, dense_ms=0.30)
    monkeypatch.setattr(convert, "sparse_step_pays", sparse_step_pays)
    monkeypatch.setattr(convert, "device_name", lambda device: "NVIDIA H200")

    def convert_tiny(backend="auto"):
        lines, model = [], tiny_gpt()
        config = SparseConfig(backend=backend, tokens=256, micro_batches=4, log=lines.append,
                              timing_cache=TimingCache(str(tmp_path / f"{len(calls)}.json")))
        assert convert_mlp_to_sparse(model, "cpu", config, runtime=FakeRuntime()) == 4
        return model, lines

    model, lines = convert_tiny()
    assert all(m.kernel.name == "masked" for m in sparse_layers(model)) and not calls
    off = [line for line in lines if line.startswith("2:4 GEMMs off")]
    assert len(off) == 1 and "--sparse-backend cusparselt" in off[0]
    # the pruned model still trains: each layer holds its masked weight
    assert all((m.kernel.wm == 0).float().mean() >= 0.5 for m in sparse_layers(model))

    monkeypatch.setattr(convert, "sparse_step_pays", functools.partial(
        sparse_step_pays, records=(StepRecord("NVIDIA H200", "bf16", 64, 256, 4, 1.05, "fake"),)))
    model, lines = convert_tiny()
    assert all(m.kernel.name == "cusparselt" for m in sparse_layers(model)) and len(calls) == 4
    assert any(line.startswith("2:4 GEMMs on") for line in lines)

    monkeypatch.setattr(convert, "sparse_step_pays", lambda *a: pytest.fail("the gate runs for auto only"))
    model, lines = convert_tiny(backend="cusparselt")
    assert all(m.kernel.name == "cusparselt" for m in sparse_layers(model))
