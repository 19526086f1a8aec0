"""bench_parity --merge: modes run apart (one per GPU) combine into one paired report, and runs that are
not paired are refused."""

import json

import pytest

from benchmarks.bench_parity import merge


def results(path, mode, val_bpb, steps=4, depth=2):
    meta = dict(date="2026-11-26", torch="2.13.0", gpu="cpu", command=f"python -m benchmarks.bench_parity --modes {mode}",
                depth=depth, steps=steps, total_batch_size=256, tokens=steps * 256)
    history = dict(step=list(range(steps)), loss=[4.0, 3.5, 3.2, 3.0][:steps], val_step=[0, steps], val_bpb=[3.0, val_bpb])
    run = dict(history=history, summary=dict(val_bpb=val_bpb, tok_per_sec=1000.0), command=f"train --{mode}")
    path.write_text(json.dumps(dict(meta=meta, runs={mode: run})))
    return str(path)


def test_merge_writes_one_report(tmp_path):
    a = results(tmp_path / "a.json", "dense", 2.0)
    b = results(tmp_path / "b.json", "fp8", 2.02)
    merge([a, b], str(tmp_path / "both"))
    data = json.loads((tmp_path / "both.json").read_text())
    assert list(data["runs"]) == ["dense", "fp8"] and data["meta"]["merged_from"] == ["a.json", "b.json"]
    md = (tmp_path / "both.md").read_text()
    assert "| fp8 | 2.0200 | +1.00% |" in md and (tmp_path / "both.png").stat().st_size > 0


def test_merge_refuses_runs_that_are_not_paired(tmp_path):
    a = results(tmp_path / "a.json", "dense", 2.0)
    with pytest.raises(SystemExit, match="not paired"):
        merge([a, results(tmp_path / "b.json", "fp8", 2.0, steps=3)], str(tmp_path / "x"))
    with pytest.raises(SystemExit, match="more than one"):
        merge([a, results(tmp_path / "c.json", "dense", 2.1)], str(tmp_path / "y"))
