"""
End-to-end training throughput: tokens/s, MFU, step time and peak memory of the real trainer
(nanochat.train.train, compiled) for dense, --sparse, --fp8 and --fp8 --sparse at several depths.
Each configuration runs in its own process (clean compile caches and memory), steady-state steps only:
tok/s and step time are the median over the steps after the 10th (the first ones include compilation),
since one stalled step (a neighbour's compile on a shared host stalled one 1.45 s step for 4 s) moves a mean
by several percent; the trainer's own mean is kept as tok_per_sec_mean.

    NANOCHAT_BASE_DIR=... python -m benchmarks.bench_train --depths 12 20 --modes dense sparse fp8 fp8_sparse

Needs data shards and a tokenizer under NANOCHAT_BASE_DIR (benchmarks/gpu.sh train sets that up on a GPU machine).
Writes <out>.json, <out>.md and <out>.png.
"""

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

MODES = {"dense": [], "sparse": ["--sparse"], "fp8": ["--fp8"], "fp8_sparse": ["--fp8", "--sparse"],
         "fp8_all": ["--fp8", "--fp8-layers", "all"], "fp8_sparse_all": ["--fp8", "--sparse", "--fp8-layers", "all"]}
DEFAULT_MODES = ["dense", "sparse", "fp8", "fp8_sparse"]  # the *_all modes compare against the per-layer fp8 choice


def trainer_flags(depth, mode, steps, device_batch_size, seq_len, total_batch_size):
    return ["--depth", str(depth), "--device-batch-size", str(device_batch_size), "--max-seq-len", str(seq_len),
            "--total-batch-size", str(total_batch_size), "--num-iterations", str(steps), "--warmup-steps", "5",
            "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--model-tag", f"bench_d{depth}_{mode}", *MODES[mode]]


def run_one(flags, json_path):
    """Child process: train with these flags, write the summary as JSON."""
    from nanochat.train import build_arg_parser, train
    out = train(build_arg_parser().parse_args(flags))
    s = out["summary"]
    h = out["history"]
    steady = h["tok_per_sec"][10:] or h["tok_per_sec"]
    total_batch_size = int(flags[flags.index("--total-batch-size") + 1])
    s["tok_per_sec_mean"], s["tok_per_sec"] = s["tok_per_sec"], statistics.median(steady)
    s["step_time_ms"] = 1000 * total_batch_size / s["tok_per_sec"]
    mfus = [m for m in (h["mfu"][10:] or h["mfu"]) if m is not None]
    s["mfu"] = statistics.median(mfus) if mfus else s.get("mfu")
    s["loss_curve"] = h["loss"]
    with open(json_path, "w") as f:
        json.dump(s, f)


STEP_LINE = re.compile(r"step (\d+)/\d+ \|.*\| dt ([\d.]+)ms \| tok/s ([\d,]+) \| mfu ([\d.]+%|-) \| mem ([\d.]+)GiB")


def steady_from_log(log, skip=10):
    """The same steady-state numbers as run_one, from the trainer's step lines: for a run cut off after
    training (a timeout in eval, sampling or exit) or rebuilt with --from-logs. None if no steady step."""
    steps = [m.groups() for m in STEP_LINE.finditer(log)]
    steady = [(float(dt), float(tps.replace(",", "")), mfu) for i, dt, tps, mfu, _ in steps if int(i) > skip]
    if not steady:
        return None
    mfus = [float(m[:-1]) for _, _, m in steady if m != "-"]
    tps = [t for _, t, _ in steady]
    return dict(tok_per_sec=statistics.median(tps), tok_per_sec_mean=sum(tps) / len(tps),
                step_time_ms=statistics.median(d for d, _, _ in steady),
                mfu=statistics.median(mfus) if mfus else None, peak_memory_gib=float(steps[-1][4]), steps_logged=len(steps))


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    depths = sorted({r["depth"] for r in results})
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for j, d in enumerate(depths):
            r = next((r for r in results if r["depth"] == d and r["mode"] == mode and r.get("tok_per_sec")), None)
            if r:
                xs.append(j + i * width)
                ys.append(r["tok_per_sec"] / 1e3)
        ax.bar(xs, ys, width, label=mode)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(depths))])
    ax.set_xticklabels([f"d{d}" for d in depths])
    ax.set_ylabel("thousand tokens/s")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(results, args):
    """JSON + markdown (+ PNG) of what has been measured so far; returns the markdown lines."""
    import torch
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                cusparselt=torch.backends.cusparselt.version() if torch.cuda.is_available() else None,
                command="python -m benchmarks.bench_train " + " ".join(sys.argv[1:]))
    if args.from_logs and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:  # the machine, versions and command of the run that wrote the logs
            meta = dict(json.load(f)["meta"], rebuilt_from_logs=meta["date"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    lines = [f"# Training throughput ({meta['gpu']}, torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, {meta['date']})", "",
             f"Command: `{meta['command']}`. Compiled, {args.steps} steps, median of the steps after step 10, "
             f"sequence {args.seq_len}, {args.grad_accum} micro-batches per step.", "",
             "| depth | mode | device batch | tok/s | vs dense | MFU (dense FLOPs) | step ms | peak mem GiB |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        dense = next((d for d in results if d["depth"] == r["depth"] and d["mode"] == "dense" and d.get("tok_per_sec")), None)
        if r.get("tok_per_sec"):
            ratio = f"{r['tok_per_sec'] / dense['tok_per_sec']:.3f}x" if dense else "-"
            mark = " †" if r.get("note") else ""
            lines.append(f"| {r['depth']} | {r['mode']} | {r['device_batch_size']} | {r['tok_per_sec']:,.0f}{mark} | {ratio} | "
                         f"{'-' if r.get('mfu') is None else format(r['mfu'], '.1f') + '%'} | {r['step_time_ms']:.0f} | {r['peak_memory_gib']:.1f} |")
        else:
            lines.append(f"| {r['depth']} | {r['mode']} | {r['device_batch_size']} | failed: {r['error'].strip().splitlines()[-1][:120]} | | | | |")
    notes = sorted({r["note"] for r in results if r.get("note")})
    if notes:
        lines += ["", "† steps 11 and later, " + "; ".join(notes) + "."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if any(r.get("tok_per_sec") for r in results):
        plot(results, args.out + ".png")
    return lines


def run_child(flags, log_path, timeout, row):
    """One configuration in a fresh process; fills `row` from its summary. Returns an error text or None."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log_file:
        out_json = os.path.join(tmp, "summary.json")
        try:
            r = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--one", json.dumps(flags), out_json],
                               stdout=log_file, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout}s"
        if r.returncode != 0:
            with open(log_path) as f:
                return f.read()[-1500:]
        with open(out_json) as f:
            row.update(json.load(f))
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--depths", type=int, nargs="+", default=[12, 20, 26])
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--device-batch-size-d26", type=int, default=None, help="override for depth >= 26 (memory)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--timeout", type=int, default=420, help="seconds per configuration")
    p.add_argument("--out", default="benchmarks/results/train_bench")
    p.add_argument("--from-logs", action="store_true",
                   help="run nothing: rebuild the results from the <out>_d<depth>_<mode>.log files of an earlier run")
    p.add_argument("--one", nargs=2, metavar=("FLAGS_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        run_one(json.loads(args.one[0]), args.one[1])
        return

    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    earlier = {}
    if args.from_logs and os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            earlier = {(r["depth"], r["mode"]): r for r in json.load(f)["results"]}
    results = []
    for depth in args.depths:
        B = args.device_batch_size_d26 if (depth >= 26 and args.device_batch_size_d26) else args.device_batch_size
        for mode in args.modes:
            flags = trainer_flags(depth, mode, args.steps, B, args.seq_len, B * args.seq_len * args.grad_accum)
            row = dict(depth=depth, mode=mode, device_batch_size=B, seq_len=args.seq_len, grad_accum=args.grad_accum,
                       micro_batches=args.grad_accum, steps=args.steps, gpu=gpu, date=datetime.date.today().isoformat(),
                       command="python -m scripts.base_train " + " ".join(flags))
            log_path = f"{args.out}_d{depth}_{mode}.log"  # the child's full output, kept even if it times out
            if args.from_logs:
                if not os.path.exists(log_path):
                    continue
                # the flags that actually ran are in the earlier JSON, if the run got to write its row
                row.update(earlier.get((depth, mode), dict(command=None)))
                if not row.get("tok_per_sec"):  # a row the run completed stays as it was
                    row["error"] = row.get("error") or "the log ends before step 11"
                row.setdefault("error", None)
            else:
                row["error"] = run_child(flags, log_path, args.timeout, row)
            with open(log_path) as f:
                log = f.read()
            steady = steady_from_log(log) if row["error"] else None
            if steady:
                # trained past step 10, then stopped (e.g. timed out in the final eval): the step lines hold the numbers
                row.update(steady, note="from the step lines of the log: " + row["error"].strip().splitlines()[-1][:100])
            if row["error"] is None or row.get("note"):
                row.pop("error")
            row["log_tail"] = "\n".join(l for l in log.splitlines() if "sparsity" in l or "fp8" in l.lower() or "kernel" in l)
            results.append(row)
            status = f"{row['tok_per_sec']:,.0f} tok/s" if row.get("tok_per_sec") else "FAILED: " + row["error"].strip().splitlines()[-1][:200]
            print(f"d{depth} {mode}: {status}", flush=True)
            write_outputs(results, args)  # after every configuration: a cut-off run keeps what it measured

    print("\n".join(write_outputs(results, args)))


if __name__ == "__main__":
    main()
