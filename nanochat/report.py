"""Markdown reports: a training run (with a loss-curve PNG beside it) and a checkpoint evaluation (with its JSON)."""

import datetime
import functools
import json
import os

from nanochat.common import UserError


def plot_loss_curve(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["loss"], label="train loss", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    if history["val_bpb"]:
        ax2 = ax.twinx()
        ax2.plot(history["val_step"], history["val_bpb"], "o-", color="tab:red", label="val bpb")
        ax2.set_ylabel("val bits per byte")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fails_in_one_line(write):
    """A report that cannot be written (full disk, read-only directory) is one line naming the directory."""
    @functools.wraps(write)
    def wrapper(report_dir, *args, **kwargs):
        from nanochat.storage import disk_error, free_bytes
        try:
            return write(report_dir, *args, **kwargs)
        except Exception as e:
            err = disk_error(e)
            if err is None:
                raise
            raise UserError(f"writing the report to {report_dir} failed ({err.strerror}; {free_bytes(report_dir):,} bytes "
                            f"free there): free space or fix the directory's permissions or mount")
    return wrapper


@fails_in_one_line
def write_train_report(report_dir, model_tag, args, history, summary):
    """Writes <report_dir>/<model_tag>.md and <model_tag>_loss.png; returns the markdown path."""
    os.makedirs(report_dir, exist_ok=True)
    png = os.path.join(report_dir, f"{model_tag}_loss.png")
    if history["step"]:
        plot_loss_curve(history, png)

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:,.4f}" if isinstance(v, float) else str(v)

    lines = [f"# Training report: {model_tag}", "",
             f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             "## Result", "", "| metric | value |", "|---|---|"]
    for key in ("val_bpb", "core_metric", "final_loss", "tok_per_sec", "mfu", "peak_memory_gib", "num_iterations", "num_params",
                "flops_per_token", "num_sparse_layers", "world_size", "device", "torch_version", "total_train_time"):
        lines.append(f"| {key} | {fmt(summary.get(key))} |")
    if history["step"]:
        lines += ["", f"![loss curve]({os.path.basename(png)})"]
    if summary.get("core"):
        lines += ["", f"## CORE at step {summary['core_step']}", ""] + core_table(summary["core"])
    if summary.get("samples"):
        lines += ["", "## Samples (greedy)", ""] + [f"- `{s!r}`" for s in summary["samples"]]
    lines += ["", "## Arguments", "", "| flag | value |", "|---|---|"]
    lines += [f"| --{k.replace('_', '-')} | {v} |" for k, v in sorted(args.items())]
    path = os.path.join(report_dir, f"{model_tag}.md")
    _write_atomic(path, "\n".join(lines) + "\n")
    return path


def core_line(core):
    """One line: the CORE metric against the GPT-2 bar."""
    from nanochat.core_eval import GPT2_CORE
    verdict = "above" if core["core_metric"] > GPT2_CORE else "below"
    return f"CORE {core['core_metric']:.4f} ({verdict} GPT-2 1.5B's {GPT2_CORE:.4f})"


def core_table(core):
    """Markdown lines: one row per task (accuracy, random baseline, centered), then CORE."""
    lines = ["| task | type | shots | examples | accuracy | random baseline | centered |", "|---|---|---|---|---|---|---|"]
    for label, r in core["tasks"].items():
        lines.append(f"| {label} | {r['type']} | {r['num_fewshot']} | {r['examples']} | {r['accuracy']:.4f} | "
                     f"{r['baseline'] / 100:.4f} | {r['centered']:.4f} |")
    lines.append(f"| **CORE** | | | | | | **{core['core_metric']:.4f}** |")
    return lines + ["", core_line(core)]


@fails_in_one_line
def write_eval_report(report_dir, results):
    """results: scripts.base_eval's dict. Writes <tag>_eval_<step>.json and .md; returns both paths."""
    os.makedirs(report_dir, exist_ok=True)
    stem = os.path.join(report_dir, f"{results['model_tag']}_eval_{results['step']:06d}")
    _write_atomic(stem + ".json", json.dumps(results, indent=2) + "\n")
    lines = [f"# Evaluation: {results['model_tag']} step {results['step']}", "",
             f"Date: {results['date']} | device: {results['device']} x {results['world_size']} | "
             f"checkpoint: {results['checkpoint_dir']} | sparse: {results['sparse']} | fp8: {results['fp8']}", ""]
    if "core" in results:
        lines += ["## CORE", ""] + core_table(results["core"]) + [""]
    if "bpb" in results:
        lines += ["## Bits per byte", "", f"val bpb {results['bpb']['val']:.4f} on {results['bpb']['tokens']:,} tokens", ""]
    if results.get("samples"):
        lines += ["## Samples (greedy)", ""] + [f"- `{s!r}`" for s in results["samples"]] + [""]
    _write_atomic(stem + ".md", "\n".join(lines))
    return stem + ".json", stem + ".md"


def _write_atomic(path, text):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
