"""
Activation sparsity over a training run (issue 14, step 1): per MLP layer, how sparse the relu² output h is
at init and at each saved checkpoint, and what pruning it 2:4 would cost (benchmarks/experimental/act_stats.py). Trains once
through the library trainer with --save-every (all checkpoints kept), then measures every checkpoint on the
same val batches, eager, under the trainer's autocast (bf16 on CUDA, fp32 on CPU).

    NANOCHAT_BASE_DIR=... python -m benchmarks.experimental.act_sparsity                  # make train's d4 CPU run, 300 steps
    NANOCHAT_BASE_DIR=... python -m benchmarks.experimental.act_sparsity --measure-only   # measure the saved checkpoints again
    bash benchmarks/gpu.sh act_sparsity --depth 12 ...                        # on a GPU (docs/act-sparsity-notes.md)

Step 0 is the run's init, rebuilt from its seed the way train() builds it (the trainer saves no step 0).
Writes <out>.json (per step and layer, with the command, date, device and versions), <out>.md and <out>.png.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from contextlib import nullcontext

import torch

from nanochat.common import UserError, autodetect_device_type, get_base_dir, run_main

PAPER_ZERO_FRAC = 0.9  # Haziza et al. 2025: squared-ReLU FFN outputs are > 90% zeros after a short warm-up


def build_arg_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    # the run: make train's CPU configuration by default
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument("--total-batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of the run")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--save-every", type=int, default=25, help="a checkpoint (a measured point) every N steps")
    p.add_argument("--device-type", default="", help="cuda|cpu (empty = autodetect)")
    p.add_argument("--extra", default="", help="more trainer flags, e.g. '--sparse' or '--matrix-lr 0.03'")
    p.add_argument("--model-tag", default="", help="checkpoint directory (default act_sparsity_d<depth>)")
    # the measurement
    p.add_argument("--eval-batches", type=int, default=4, help="val micro-batches measured at every point")
    p.add_argument("--measure-only", action="store_true", help="skip training: measure the tag's saved checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue the tag's run from its newest checkpoint (bit-exact on CPU), then measure; a run cut "
                        "off (a time limit) is finished in pieces this way")
    p.add_argument("--note", default="", help="a line for the results files (how the run went, what was lost)")
    p.add_argument("--out", default="out/act_sparsity_{device}_d{depth}",
                   help="output path without extension; {device} (cpu, h100, ...) and {depth} are filled in")
    return p


def trainer_flags(args, tag, resume_from=None):
    eval_tokens = args.eval_batches * args.device_batch_size * args.max_seq_len
    flags = ["--depth", str(args.depth), "--aspect-ratio", str(args.aspect_ratio), "--head-dim", str(args.head_dim),
             "--max-seq-len", str(args.max_seq_len), "--device-batch-size", str(args.device_batch_size),
             "--total-batch-size", str(args.total_batch_size), "--num-iterations", str(args.steps),
             "--warmup-steps", str(args.warmup_steps), "--eval-every", "-1", "--eval-tokens", str(eval_tokens),
             "--sample-every", "0", "--save-every", str(args.save_every), "--keep-last-k", "0",
             "--model-tag", tag]
    flags += ["--overwrite"] if resume_from is None else ["--resume-from-step", str(resume_from)]
    if args.device_type:
        flags += ["--device-type", args.device_type]
    return flags + args.extra.split()


RUN_FLAGS = ("depth", "aspect_ratio", "head_dim", "max_seq_len", "device_batch_size", "total_batch_size", "num_iterations",
             "warmup_steps", "warmdown_ratio", "matrix_lr", "embedding_lr", "unembedding_lr", "seed", "sparse", "fp8")


def run_flags(run_args):
    """The trainer flags that shape the run, from the args a checkpoint's meta records."""
    flags = []
    for k in RUN_FLAGS:
        v = run_args.get(k)
        if isinstance(v, bool):
            flags += [f"--{k.replace('_', '-')}"] if v else []
        elif v is not None:
            flags.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(flags)


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def short_device(device):
    """'cpu', or the GPU's model as in 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    if device.type != "cuda":
        return device.type
    words = torch.cuda.get_device_name(device).split()
    return (words[1] if len(words) > 1 and words[0] == "NVIDIA" else words[0]).lower()


def init_model(meta, device):
    """The run's step-0 model: train() seeds, builds the GPT on the device and calls init_weights()."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(meta["args"]["seed"])
    with torch.device(device):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.init_weights()
    return model


def measure_run(checkpoint_dir, device, eval_batches, log=print):
    """[{"step", "loss", "loss_pruned", "tokens", "layers"}] for step 0 and every saved step, on the first
    eval_batches val micro-batches of the run's shape."""
    from nanochat import checkpoint
    from benchmarks.experimental.act_stats import measure
    from nanochat.dataloader import DistributedDataLoader
    from nanochat.tokenizer import get_tokenizer

    steps = checkpoint.saved_steps(checkpoint_dir)
    if not steps:
        raise UserError(f"no checkpoints in {checkpoint_dir}: run without --measure-only first, or check --model-tag")
    meta = checkpoint.load_meta(checkpoint_dir, steps[-1], step_flag="--model-tag")
    run_args = meta["args"]
    loader = DistributedDataLoader(get_tokenizer(), run_args["device_batch_size"], run_args["max_seq_len"], "val", device)
    batches = [loader.next_batch() for _ in range(eval_batches)]
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    points = []
    for step in [0] + steps:
        model = init_model(meta, device) if step == 0 else \
            checkpoint.load_model_for_inference(checkpoint_dir, step, device)[0]
        r = measure(model, batches, autocast_ctx)
        points.append(dict(step=step, **r))
        zeros = " ".join(f"{l['zero_frac']:.3f}" for l in r["layers"])
        le2 = " ".join(f"{l['groups_le2_frac']:.3f}" for l in r["layers"])
        log(f"step {step:6d} | zeros {zeros} | <=2-of-4 {le2} | loss {r['loss']:.4f} pruned {r['loss_pruned']:.4f}")
        del model
    return points, meta


def fmt(v, pct=True):
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def write_markdown(path, result):
    m, points = result["meta"], result["points"]
    n_layer = len(points[0]["layers"])
    lines = [f"# relu² activation sparsity per MLP layer, d{m['depth']} ({m['device']}, torch {m['torch']}, {m['date']})", "",
             f"{m['steps']} steps x {m['tokens_per_step']:,} tokens; measured on {points[0]['tokens']:,} val tokens "
             f"at each point (the first {m['eval_batches']} val micro-batches). Run: `{run_flags(m['run_args'])}`; final val bpb "
             f"{fmt(m['final_val_bpb'], pct=False)}. Command: `{m['command']}`"
             + (f" (its training resumed from step {m['resumed_from_step']})" if m.get("resumed_from_step") else "")
             + "." + (f" {m['note']}" if m.get("note") else ""), "",
             "h = relu(c_fc(x))², c_proj's input (tokens x 4d); 4-groups are 4 consecutive features of one token. "
             f"The paper's regime (Haziza et al. 2025): > {100 * PAPER_ZERO_FRAC:.0f}% zeros after warm-up.", ""]
    tables = [("Exact zeros in h", "zero_frac"),
              ("4-groups with <= 2 non-zeros (2:4 pruning leaves them unchanged)", "groups_le2_frac"),
              ("Share of sum(h²) that 2:4 pruning (keep the 2 largest of 4) drops", "dropped_l2_frac"),
              ("Relative error 2:4 pruning puts into the MLP output, ||c_proj(dropped)|| / ||c_proj(h)||", "out_rel_err")]
    header = "| step | " + " | ".join(f"layer {i}" for i in range(n_layer)) + " | mean |"
    sep = "|---" * (n_layer + 2) + "|"
    for title, key in tables:
        lines += [f"## {title}", "", header, sep]
        for p in points:
            vals = [l[key] for l in p["layers"]]
            known = [v for v in vals if v is not None]
            mean = sum(known) / len(known) if known else None
            lines.append(f"| {p['step']} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(mean)} |")
        lines.append("")
    lines += ["## Val loss (nats/token) with h as is and with every layer's h pruned 2:4", "",
              "| step | loss | loss, h pruned 2:4 | difference |", "|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['step']} | {p['loss']:.4f} | {p['loss_pruned']:.4f} | "
                     f"{p['loss_pruned'] - p['loss']:+.4f} ({100 * (p['loss_pruned'] / p['loss'] - 1):+.2f}%) |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path, result):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    m, points = result["meta"], result["points"]
    steps = [p["step"] for p in points]
    n_layer = len(points[0]["layers"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [(axes[0], "zero_frac", "fraction of exact zeros in h"),
              (axes[1], "groups_le2_frac", "fraction of 4-groups with <= 2 non-zeros"),
              (axes[2], "dropped_l2_frac", "share of sum(h²) dropped by 2:4 pruning")]
    for ax, key, label in panels:
        for i in range(n_layer):
            vals = [p["layers"][i][key] for p in points]
            ax.plot(steps, [float("nan") if v is None else v for v in vals], "o-", markersize=3, label=f"layer {i}")
        ax.set_xlabel("step"), ax.set_ylabel(label), ax.grid(alpha=0.3)
    axes[0].axhline(PAPER_ZERO_FRAC, color="k", linestyle="--", linewidth=0.8, label="paper: > 90%")
    for ax in axes[:2]:
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"relu² output sparsity per MLP layer, d{m['depth']}, {m['device']} ({m['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_arg_parser().parse_args(argv)
    if args.eval_batches < 1 or args.save_every < 1:
        raise UserError("--eval-batches and --save-every must be >= 1")
    device = torch.device(args.device_type or autodetect_device_type())
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # as the trainer: the measured h is the h training computed
    tag = args.model_tag or f"act_sparsity_d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", tag)
    resume_from = None
    if args.resume:
        from nanochat.checkpoint import saved_steps
        saved = saved_steps(checkpoint_dir)
        if not saved:
            raise UserError(f"--resume: no checkpoints in {checkpoint_dir}; start the run without --resume")
        resume_from = saved[-1]
    flags = trainer_flags(args, tag, resume_from)
    summary, history, train_s = None, None, None
    if resume_from == args.steps:
        print(f"the run is complete (step {resume_from} saved): measuring only")
    elif not args.measure_only:
        from nanochat.flags import build_arg_parser as trainer_parser
        from nanochat.train import train
        t0 = time.time()
        out = train(trainer_parser().parse_args(flags))
        train_s = time.time() - t0
        summary, history = out["summary"], out["history"]
        checkpoint_dir = summary["checkpoint_dir"]
    t0 = time.time()
    points, run_meta = measure_run(checkpoint_dir, device, args.eval_batches)
    measure_s = time.time() - t0

    run_args = run_meta["args"]
    meta = dict(date=datetime.date.today().isoformat(), device=device_name(device), torch=torch.__version__,
                python=platform.python_version(), command="python -m benchmarks.experimental.act_sparsity " + shlex.join(argv),
                trainer_flags=trainer_flags(args, tag), run_args=run_args, checkpoint_dir=checkpoint_dir,
                depth=run_meta["model_config"]["n_layer"], model_config=run_meta["model_config"],
                steps=max(p["step"] for p in points), tokens_per_step=run_args["total_batch_size"],
                seed=run_args["seed"], eval_batches=args.eval_batches, train_seconds=train_s, measure_seconds=measure_s,
                final_val_bpb=run_meta.get("loop_state", {}).get("val_bpb"), note=args.note, paper_zero_frac=PAPER_ZERO_FRAC,
                step0="the run's init, rebuilt from its seed as train() builds it (no checkpoint at step 0)")
    if summary is None:
        meta["trainer_flags"] = None  # trained by an earlier call: run_args holds what the checkpoints record
    elif resume_from is not None:
        meta["resumed_from_step"] = resume_from  # train_seconds and the loss history cover this last piece only
    result = dict(meta=meta, points=points,
                  train=dict(final_val_bpb=summary["val_bpb"], final_loss=summary["final_loss"],
                             step=history["step"], loss=history["loss"], tok_per_sec=summary["tok_per_sec"])
                  if summary else None)
    out = args.out.format(device=short_device(device), depth=meta["depth"])
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(out + ".md", result)
    plot(out + ".png", result)
    print(f"wrote {out}.json, .md, .png (train {train_s or 0:.0f}s, measure {measure_s:.0f}s)")
    return result


if __name__ == "__main__":
    run_main(main)
