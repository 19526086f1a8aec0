"""
Accuracy parity: paired training runs (same seed, data, tokens, schedule) of dense vs --sparse
(and optionally --fp8, --fp8 --sparse), val bits-per-byte curves in one PNG, final numbers in JSON/markdown.
Each run is its own process through the library trainer (nanochat.train.train).

    NANOCHAT_BASE_DIR=... python -m benchmarks.bench_parity --depth 12 --steps 300 --modes dense sparse
    python -m benchmarks.bench_parity --merge a.json b.json --out parity_d12   # modes run apart (e.g. one per GPU)
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile

from benchmarks import common_args as common
from benchmarks.bench_train import MODES


def run_one(flags, json_path):
    from nanochat.flags import build_arg_parser
    from nanochat.train import train
    out = train(build_arg_parser().parse_args(flags))
    with open(json_path, "w") as f:
        json.dump(dict(history=out["history"], summary=out["summary"]), f)


def plot(runs, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, r in runs.items():
        h = r["history"]
        axes[0].plot(h["val_step"], h["val_bpb"], "o-", label=mode, markersize=3)
        axes[1].plot(h["step"], h["loss"], label=mode, linewidth=0.8)
    axes[0].set_xlabel("step"), axes[0].set_ylabel("val bits per byte"), axes[0].set_title("validation")
    axes[1].set_xlabel("step"), axes[1].set_ylabel("train loss"), axes[1].set_title("training")
    axes[1].set_ylim(top=min(8, max(max(r["history"]["loss"]) for r in runs.values())))
    for ax in axes:
        ax.legend(), ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(runs, meta, depth, steps, total_batch_size, out):
    """Write out.json, out.md (final val bpb per mode against dense) and out.png (the curves)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, runs=runs), f, indent=2)
    ref = runs.get("dense", {}).get("summary", {}).get("val_bpb")
    lines = [f"# Accuracy parity, d{depth} ({meta['gpu']}, torch {meta['torch']}, {meta['date']})", "",
             f"Paired runs: same seed, data and schedule; {steps} steps x {total_batch_size:,} tokens "
             f"= {meta['tokens']:,} tokens. Command: `{meta['command']}`.", "",
             "| mode | final val bpb | vs dense (relative) | tok/s |", "|---|---|---|---|"]
    for mode, r in runs.items():
        s = r["summary"]
        rel = f"{100 * (s['val_bpb'] / ref - 1):+.2f}%" if ref else "-"
        lines.append(f"| {mode} | {s['val_bpb']:.4f} | {rel} | {s['tok_per_sec']:,.0f} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if runs:
        plot(runs, out + ".png", f"d{depth}: paired runs, {meta['gpu']}")
    print("\n".join(lines))


def merge(paths, out):
    """One report from several results files of the same depth, steps and batch (their modes side by side)."""
    runs, metas = {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        metas.append(data["meta"])
        for mode, run in data["runs"].items():
            if mode in runs:
                raise SystemExit(f"error: mode {mode} is in more than one of {paths}")
            runs[mode] = dict(run, command=run.get("command", data["meta"]["command"]))
    keys = ("depth", "steps", "total_batch_size", "tokens")
    if len({tuple(m.get(k) for k in keys) for m in metas}) != 1:
        raise SystemExit(f"error: {paths} differ in depth, steps or batch: their runs are not paired")
    meta = dict(metas[0], command="; ".join(m["command"] for m in metas), merged_from=[os.path.basename(p) for p in paths])
    report(runs, meta, meta["depth"], meta["steps"], meta["total_batch_size"], out)


def build_arg_parser():
    p = common.parser(__doc__)
    common.add_depth(p, 12)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each run")
    common.add_modes(p, ["dense", "sparse"], choices=list(MODES))
    common.add_device_batch_size(p)
    common.add_seq_len(p)
    p.add_argument("--total-batch-size", type=int, default=131072)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-tokens", type=int, default=524288)
    common.add_trainer_flags(p)
    common.add_out(p, "out/parity")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine the runs of these results files (one mode each, e.g. from different GPUs) into --out")
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    return p


def main():
    args = build_arg_parser().parse_args()
    if args.one:
        run_one(json.loads(args.one[0]), args.one[1])
        return
    if args.merge:
        merge(args.merge, args.out)
        return
    import torch
    base = ["--depth", str(args.depth), "--num-iterations", str(args.steps), "--device-batch-size", str(args.device_batch_size),
            "--max-seq-len", str(args.seq_len), "--total-batch-size", str(args.total_batch_size),
            "--eval-every", str(args.eval_every), "--eval-tokens", str(args.eval_tokens), "--sample-every", "-1",
            "--save-every", "0", "--warmup-steps", "20", *args.trainer_flags.split()]
    runs = {}
    for mode in args.modes:
        flags = base + ["--model-tag", f"parity_d{args.depth}_{mode}", *MODES[mode]]
        with tempfile.TemporaryDirectory() as tmp:
            out_json = os.path.join(tmp, "run.json")
            r = subprocess.run([sys.executable, "-m", "benchmarks.bench_parity", "--one", json.dumps(flags), out_json],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{mode}: FAILED\n{r.stderr[-2000:]}", flush=True)
                continue
            with open(out_json) as f:
                runs[mode] = json.load(f)
            runs[mode]["command"] = "python -m scripts.base_train " + " ".join(flags)
            runs[mode]["log"] = [l for l in r.stdout.splitlines() if "sparsity" in l or "kernels" in l or "fp8" in l.lower()]
        s = runs[mode]["summary"]
        print(f"{mode}: final val bpb {s['val_bpb']:.4f}, {s['tok_per_sec']:,.0f} tok/s", flush=True)

    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                command="python -m benchmarks.bench_parity " + shlex.join(sys.argv[1:]),
                depth=args.depth, steps=args.steps, total_batch_size=args.total_batch_size,
                tokens=args.steps * args.total_batch_size)
    report(runs, meta, args.depth, args.steps, args.total_batch_size, args.out)


if __name__ == "__main__":
    main()
