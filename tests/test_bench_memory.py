"""benchmarks/bench_memory.py on CPU with a tiny model: the library call, the command line (one child
process per configuration, JSON + markdown), the peak replay of an allocator trace, and the CPU
analysis of what the compiled forward saves for backward."""

import json
import math
import os
import subprocess
import sys

import pytest

import nanochat.gpt
import nanochat.loss
import torch._functorch.config

from benchmarks.bench_memory import config_flags, measure, parse_partitioner, peak_allocations, saved_activations

TINY = ["--device-type", "cpu", "--aspect-ratio", "32", "--head-dim", "32"]


@pytest.fixture
def data(tiny_data_dir, tiny_tokenizer):
    return tiny_data_dir


def test_measure_in_process(data):
    row = measure(config_flags(2, "dense", 4, steps=2, seq_len=32, micro_batches=2, extra=TINY))
    assert row["oom"] is False and row["error"] is None
    assert row["peak_memory_gib"] > 0 and row["peak_reserved_gib"] is None  # CPU: peak RSS
    assert math.isfinite(row["final_loss"]) and row["tok_per_sec"] > 0
    assert nanochat.gpt.linear_softcap_cross_entropy is nanochat.loss.linear_softcap_cross_entropy


def test_command_line_writes_json_and_table(data, tmp_path):
    out = str(tmp_path / "mem")
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--depths", "2", "--device-batch-sizes", "4", "--modes", "dense",
           "--loss", "chunked", "reference", "--steps", "2", "--seq-len", "32", "--out", out, "--trainer-flags", " ".join(TINY)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out + ".json") as f:
        res = json.load(f)
    rows = res["results"]
    assert [r["loss"] for r in rows] == ["chunked", "reference"]
    for row in rows:
        for key in ("depth", "mode", "device_batch_size", "micro_batches", "peak_memory_gib", "gpu", "torch", "date", "command"):
            assert row[key] is not None, key
        assert row["depth"] == 2 and row["mode"] == "dense" and row["gpu"] == "cpu" and not row["error"]
    # the same two training steps with either loss: the same losses up to rounding
    assert rows[0]["final_loss"] == pytest.approx(rows[1]["final_loss"], rel=1e-4)
    with open(out + ".md") as f:
        table = f.read()
    assert "| 2 | dense | chunked | default | 4 | 2 |" in table and "| 2 | dense | reference | default | 4 | 2 |" in table
    assert os.path.exists(out + "_d2_dense_b4_chunked.log")


def test_peak_allocations_replays_the_trace():
    frames = lambda line: [{"filename": "/x/torch/nn/functional.py", "line": 1, "name": "f"},
                           {"filename": "/repo/nanochat/gpt.py", "line": line, "name": "forward"}]
    trace = [dict(action="alloc", addr=1, size=100, frames=frames(10)),
             dict(action="alloc", addr=2, size=50, frames=frames(20)),
             dict(action="free_requested", addr=1, size=100),  # still allocated until completed
             dict(action="alloc", addr=3, size=30, frames=frames(10)),  # the peak: 180
             dict(action="free_completed", addr=1, size=100),
             dict(action="alloc", addr=4, size=60, frames=frames(30))]  # 140
    peak, sites = peak_allocations({"device_traces": [trace]})
    assert peak == 180
    assert sites == [("gpt.py:10 (forward)", 130, 2, 100), ("gpt.py:20 (forward)", 50, 1, 50)]


def test_compiled_forward_saves_no_vocab_sized_tensor():
    """The old formula's compiled forward keeps the bf16 logits (2 bytes x vocab per token) for backward;
    the chunked loss keeps only per-token x dim gradients. (With fewer tokens than ~2x the width the
    partitioner may rather keep a chunk's bf16 grad-logits than the fp32 grad-weight: not a real size.)"""
    chunked = saved_activations(n_embd=128, seq_len=640, vocab_size=1000, head_dim=32, loss="chunked")
    ref = saved_activations(n_embd=128, seq_len=640, vocab_size=1000, head_dim=32, loss="reference")
    assert chunked["vocab_bytes_per_token"] == 0
    assert ref["vocab_bytes_per_token"] >= 2 * 1000
    assert 30 < chunked["per_layer"] < 80 and 30 < ref["per_layer"] < 80  # bytes per token x dim per layer
    assert nanochat.gpt.linear_softcap_cross_entropy is nanochat.loss.linear_softcap_cross_entropy


def test_partitioner_variant_recomputes_elementwise_ops_instead_of_saving_them():
    assert parse_partitioner("default") == {}
    knob = parse_partitioner("ban_recompute_materialized_backward=False")
    assert knob == {"ban_recompute_materialized_backward": False}
    before = torch._functorch.config.ban_recompute_materialized_backward
    base = saved_activations(n_embd=128, seq_len=640, vocab_size=1000, head_dim=32)
    less = saved_activations(n_embd=128, seq_len=640, vocab_size=1000, head_dim=32, partitioner=knob)
    assert less["per_layer"] < base["per_layer"] - 8  # relu^2 (8 bytes per token x dim) and more
    assert torch._functorch.config.ban_recompute_materialized_backward == before  # restored
