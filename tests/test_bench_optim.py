"""benchmarks/bench_optim.py on CPU in a tiny config: one row per Muon variant, and its baseline (the
step before sharding) is checked against today's Muon in test_optim.py."""

import json
import os


from benchmarks.bench_optim import bench, build_arg_parser, write_outputs


def test_bench_optim_tiny_cpu_run_writes_rows(tmp_path):
    args = build_arg_parser().parse_args(["--device", "cpu", "--depth", "2", "--seq-len", "32", "--device-batch-size", "2",
                                          "--vocab-size", "256", "--warm-steps", "1", "--steps", "2", "--out", str(tmp_path)])
    rows = bench(args)
    write_outputs(rows, args.out)
    assert [r["muon"] for r in rows] == ["stacked", "replicated"]  # one process: sharded is replicated
    with open(os.path.join(tmp_path, "optim_d2_ws1.json")) as f:
        assert json.load(f) == rows
    for r in rows:
        assert (r["mode"], r["micro_batches"], r["world_size"], r["gpu"]) == ("dense", 1, 1, "cpu")
        assert 0 < r["optimizer_ms"] < r["step_ms"] and 0 < r["optimizer_share"] < 1
        assert r["command"].startswith("python -m benchmarks.bench_optim")
