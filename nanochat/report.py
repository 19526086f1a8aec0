"""A markdown report of a training run, with a loss-curve PNG beside it."""

import datetime
import os


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
    for key in ("val_bpb", "final_loss", "tok_per_sec", "mfu", "peak_memory_gib", "num_iterations", "num_params",
                "flops_per_token", "num_sparse_layers", "world_size", "device", "torch_version", "total_train_time"):
        lines.append(f"| {key} | {fmt(summary.get(key))} |")
    if history["step"]:
        lines += ["", f"![loss curve]({os.path.basename(png)})"]
    if summary.get("samples"):
        lines += ["", "## Samples (greedy)", ""] + [f"- `{s!r}`" for s in summary["samples"]]
    lines += ["", "## Arguments", "", "| flag | value |", "|---|---|"]
    lines += [f"| --{k.replace('_', '-')} | {v} |" for k, v in sorted(args.items())]
    path = os.path.join(report_dir, f"{model_tag}.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
