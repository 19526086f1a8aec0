"""
The 2:4 margin of nanochat/accel/kernel_choice.py, fitted on whole runs (docs/measuring.md, "The kernel choices").

Per depth, a `--sparse` step differs from the dense one by

    layers x micro_batches x sum over the ops that ran 2:4 (S x sparse_ms - dense_ms)  +  R

with sparse_ms and dense_ms the tuner's burst timings of each op (the trainer's `2:4 kernels for ...` lines),
S how much worse a 2:4 GEMM does in the step than timed alone (relative to the dense one), and R what the mode
adds once per step (re-pack, ...). The runs at 1 and at 4 micro-batches per step give two equations in S and R.
`--fp8 --sparse` against `--fp8` has one run (d26, 4 micro-batches): there R is taken as its logged pack - cast
per step plus what the bf16 fit at d26 leaves beside compression (the mask, the same in both). Inputs: the
bench_train records (step times and, where recorded, the kernel lines). Prints one row per fit.

    python -m benchmarks.fit_kernel_margin
"""

import json
import os
import re

RESULTS = os.path.join(os.path.dirname(__file__), "results")

# d20's kernel lines: its process-method records (2026-12-02) predate bench_train keeping them; these are the
# tuner's lines on an H200 with the same code, 2026-11-26
# (git show 54fbcf66:benchmarks/results/logs_2026-11-26_s3_call1/train_d20_g0_d20_sparse.log).
D20_KERNEL_LINES = [
    "2:4 kernels for 20 layers of weight 5120x1280 (c_fc) at T=32768: fwd cuSPARSELt alg 17 (sparse 0.436 ms, dense 0.536 ms; "
    "compress 0.039 ms/step, learned), dgrad cuSPARSELt alg 17 (sparse 0.396 ms, dense 0.544 ms; compress 0.057 ms/step, learned)",
    "2:4 kernels for 20 layers of weight 1280x5120 (c_proj) at T=32768: fwd cuSPARSELt alg 17 (sparse 0.396 ms, dense 0.546 ms; "
    "compress 0.039 ms/step, learned), dgrad cuSPARSELt alg 17 (sparse 0.436 ms, dense 0.560 ms; compress 0.058 ms/step, learned)",
]

# the fp8 2:4 run's lines, from its record (train_d26_mb4_fp8_process_h200.md: the call's log of that mode)
FP8_D26_KERNEL_LINES = [
    "fp8 2:4 kernels for 26 layers of weight 6656x1664 (c_fc): fwd 2:4, dgrad 2:4; packers learned/learned (T=32768, fwd 2:4 "
    "(2:4 0.441 ms, dense 0.520 ms; pack 0.102 ms/step, cast 0.060), dgrad 2:4 (2:4 0.405 ms, dense 0.498 ms; pack 0.158 ms/step, "
    "cast 0.065))",
    "fp8 2:4 kernels for 26 layers of weight 1664x6656 (c_proj): fwd 2:4, dgrad 2:4; packers learned/learned (T=32768, fwd 2:4 "
    "(2:4 0.404 ms, dense 0.504 ms; pack 0.095 ms/step, cast 0.060), dgrad 2:4 (2:4 0.454 ms, dense 0.542 ms; pack 0.136 ms/step, "
    "cast 0.066))",
]

RUNS = {  # depth: {micro_batches: record}
    12: {4: "train_d12_process_h200", 1: "train_d12_process_h200"},
    20: {4: "train_d20_mb4_process_h200", 1: "train_d20_mb1_process_h200"},
    26: {4: "train_d26_mb4_process_h200", 1: "train_d26_mb1_process_h200"},
}

LAYERS = re.compile(r"for (\d+) layers of weight")
OP = re.compile(r"(fwd|dgrad) (dense|cuSPARSELt alg \d+) \(sparse ([\d.]+) ms, dense ([\d.]+) ms; compress ([\d.]+) ms/step")
FP8_OP = re.compile(r"(fwd|dgrad) (2:4|dense fp8) \(2:4 ([\d.]+) ms, dense ([\d.]+) ms; pack ([\d.]+) ms/step, cast ([\d.]+)\)")


def parse_ops(lines, pattern=OP):
    """[(layers, ran_2:4, sparse_ms, dense_ms, per-step cost ms)] per op of the `2:4 kernels for ...` lines
    (compress), or with FP8_OP of the `fp8 2:4 kernels for ...` lines (pack - cast)."""
    ops = []
    for line in lines:
        n = int(LAYERS.search(line).group(1))
        for _, kernel, sparse_ms, dense_ms, *cost in pattern.findall(line):
            per_step = float(cost[0]) - (float(cost[1]) if len(cost) > 1 else 0.0)
            ops.append((n, not kernel.startswith("dense"), float(sparse_ms), float(dense_ms), per_step))
    return ops


def record_run(name, depth, micro_batches):
    """(dense step ms, sparse step ms, the sparse run's kernel lines or None) of one configuration."""
    with open(os.path.join(RESULTS, name + ".json")) as f:
        data = json.load(f)
    rows = {r["mode"]: r for r in data["rows"] if r["depth"] == depth and r["micro_batches"] == micro_batches}
    res = next(r for r in data["results"] if r["depth"] == depth and r["micro_batches"] == micro_batches)
    lines = res["info"]["sparse"].get("kernel_choice")
    return rows["dense"]["step_ms"], rows["sparse"]["step_ms"], lines


def sums(mb, ops):
    """(a, b) of delta = a * S - b + R over the ops that ran 2:4."""
    return (mb * sum(n * s for n, on, s, d, c in ops if on), mb * sum(n * d for n, on, s, d, c in ops if on))


def fit(runs):
    """S and R from {micro_batches: (dense_ms, sparse_ms, ops)} at two micro-batch counts."""
    (mb_a, (da, sa, ops_a)), (mb_b, (db, sb, ops_b)) = sorted(runs.items())
    (a1, b1), (a2, b2) = sums(mb_a, ops_a), sums(mb_b, ops_b)
    # (sa - da) = a1 S - b1 + R ; (sb - db) = a2 S - b2 + R
    S = ((sb - db + b2) - (sa - da + b1)) / (a2 - a1)
    R = (sa - da) - a1 * S + b1
    return S, R


def main():
    print("| fit | 2:4 / dense timed alone, per op | S | R ms/step | logged per-step pack cost ms |")
    print("|---|---|---|---|---|")
    leftover = {}
    for depth, by_mb in RUNS.items():
        runs = {}
        for mb, name in by_mb.items():
            dense_ms, sparse_ms, lines = record_run(name, depth, mb)
            runs[mb] = (dense_ms, sparse_ms, parse_ops(lines or D20_KERNEL_LINES))
        S, R = fit(runs)
        ops = runs[max(runs)][2]
        compress = sum(n * c for n, on, s, d, c in ops)
        leftover[depth] = R - compress
        print(f"| d{depth}, bf16 2:4 vs bf16 | {', '.join(f'{d / s:.2f}' for n, on, s, d, c in ops)} | {S:.2f} | {R:.1f} | {compress:.1f} |")
    with open(os.path.join(RESULTS, "train_d26_mb4_fp8_process_h200.json")) as f:
        rows = {r["mode"]: r for r in json.load(f)["rows"]}
    ops = parse_ops(FP8_D26_KERNEL_LINES, FP8_OP)
    pack = sum(n * c for n, on, s, d, c in ops)
    R = pack + leftover[26]
    a, b = sums(4, ops)
    S = (rows["fp8_sparse"]["step_ms"] - rows["fp8"]["step_ms"] - R + b) / a
    print(f"| d26, fp8 2:4 vs fp8 (one run) | {', '.join(f'{d / s:.2f}' for n, on, s, d, c in ops)} | {S:.2f} | {R:.1f} | {pack:.1f} |")


if __name__ == "__main__":
    main()
