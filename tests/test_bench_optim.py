"""benchmarks/bench_optim.py on CPU in a tiny config: one row per Muon variant, and its baseline (the
step before sharding) computes what today's Muon computes."""

import json
import os

import torch

from benchmarks.bench_optim import StackedMuon, bench, build_arg_parser, write_outputs
from nanochat.optim import Muon


def test_bench_optim_tiny_cpu_run_writes_rows(tmp_path):
    args = build_arg_parser().parse_args(["--device", "cpu", "--depth", "2", "--seq-len", "32", "--device-batch-size", "2",
                                          "--vocab-size", "256", "--warmup", "1", "--steps", "2", "--out", str(tmp_path)])
    rows = bench(args)
    write_outputs(rows, args.out)
    assert [r["muon"] for r in rows] == ["stacked", "replicated"]  # one process: sharded is replicated
    with open(os.path.join(tmp_path, "optim_d2_ws1.json")) as f:
        assert json.load(f) == rows
    for r in rows:
        assert (r["mode"], r["micro_batches"], r["world_size"], r["gpu"]) == ("dense", 1, 1, "cpu")
        assert 0 < r["optimizer_ms"] < r["step_ms"] and 0 < r["optimizer_share"] < 1
        assert r["command"].startswith("python -m benchmarks.bench_optim")


def test_stacked_baseline_equals_muon():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 16), (8, 16), (16, 8)]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, baseline = Muon(params, weight_decay=0.1), StackedMuon(copies, weight_decay=0.1)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        baseline.step()
    for p, q in zip(params, copies):
        assert torch.equal(p, q)
