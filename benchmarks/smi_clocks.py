"""
SM clock and power per stage of a `gpu.sh parallel` call, from the nvidia-smi samples of `gpu.sh smi`.

    python -m benchmarks.smi_clocks out

Reads <dir>/smi.csv and the stage start times in <dir>/parallel_gpu<i>.log ("== GPU i: STAGE (HH:MM:SS)"), and
for each stage takes the samples of its GPU at >= 95% utilisation (steady work: compiles and evals idle the
GPU) between its start and the next stage's. Writes <dir>/smi_clocks.md (median SM clock and power per stage)
and <dir>/smi_clocks.png (clock and power over time, one panel per GPU).
"""

import argparse
import csv
import os
import re
import statistics
import sys

STAGE = re.compile(r"^== GPU ([\d,]+): (.*?) \((\d\d:\d\d:\d\d)\)$")
BUSY = 95.0


def read_samples(path):
    """[(HH:MM:SS.fff, gpu, sm MHz, power W, util %)] from nvidia-smi --format=csv."""
    out = []
    with open(path) as f:
        for row in csv.reader(f):
            if len(row) < 7 or not row[1].strip().isdigit() or "MHz" not in row[2]:
                continue  # the header, or a line nvidia-smi could not fill
            out.append((row[0].split()[1], int(row[1]), float(row[2].split()[0]), float(row[3].split()[0]),
                        float(row[6].split()[0])))
    return out


def read_stages(log_dir):
    """[(gpu, stage, start, end)]: each stage runs until the next line of its log ("done" ends the list)."""
    stages = []
    for name in sorted(os.listdir(log_dir)):
        if not re.fullmatch(r"parallel_gpu\d+\.log", name):
            continue
        marks = [m.groups() for m in map(STAGE.match, open(os.path.join(log_dir, name)).read().splitlines()) if m]
        for (gpus, stage, start), (_, _, end) in zip(marks, marks[1:]):
            stages.append((int(gpus.split(",")[0]), stage.strip(), start, end))
    return stages


def summarize(samples, stages):
    rows = []
    for gpu, stage, start, end in stages:
        busy = [(c, p) for t, g, c, p, u in samples if g == gpu and start <= t[:8] < end and u >= BUSY]
        rows.append(dict(gpu=gpu, stage=stage, start=start, end=end, samples=len(busy),
                         sm_mhz=statistics.median(c for c, _ in busy) if busy else None,
                         power_w=statistics.median(p for _, p in busy) if busy else None))
    return rows


def plot(samples, stages, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gpus = sorted({g for g, *_ in stages})
    fig, axes = plt.subplots(len(gpus), 1, figsize=(9, 2.2 * len(gpus)), sharex=True, squeeze=False)

    def seconds(t):
        h, m, s = t.split(":")
        return 3600 * int(h) + 60 * int(m) + float(s)
    t0 = min(seconds(t) for t, *_ in samples)
    for ax, gpu in zip(axes[:, 0], gpus):
        mine = [(seconds(t) - t0, c, p) for t, g, c, p, _ in samples if g == gpu]
        ax.plot([x for x, _, _ in mine], [c for _, c, _ in mine], lw=0.8, label="SM MHz")
        ax2 = ax.twinx()
        ax2.plot([x for x, _, _ in mine], [p for _, _, p in mine], lw=0.6, color="tab:red", alpha=0.6, label="W")
        ax2.set_ylabel("W", color="tab:red")
        for g, stage, start, _ in stages:
            if g == gpu:
                ax.axvline(seconds(start) - t0, color="k", lw=0.6, ls=":")
                ax.text(seconds(start) - t0, ax.get_ylim()[0], " " + stage[:40], fontsize=6, rotation=90, va="bottom")
        ax.set_ylabel(f"GPU {gpu}: SM MHz")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_arg_parser():
    p = argparse.ArgumentParser(description="SM clock and power per stage of a `gpu.sh parallel` call", allow_abbrev=False)
    p.add_argument("log_dir", help="the call's output folder, with smi.csv and parallel_gpu<i>.log")
    return p


def main():
    log_dir = build_arg_parser().parse_args().log_dir
    samples, stages = read_samples(os.path.join(log_dir, "smi.csv")), read_stages(log_dir)
    if not samples or not stages:
        sys.exit(f"error: no nvidia-smi samples or no stage times in {log_dir}")
    rows = summarize(samples, stages)
    lines = [f"# SM clock and power per stage ({log_dir})", "",
             f"Samples every 0.5 s at >= {BUSY:.0f}% utilisation between a stage's start and the next one's; medians.", "",
             "| GPU | stage | from | to | samples | SM clock MHz | power W |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        clk = "-" if r["sm_mhz"] is None else f"{r['sm_mhz']:.0f}"
        pw = "-" if r["power_w"] is None else f"{r['power_w']:.0f}"
        lines.append(f"| {r['gpu']} | `{r['stage']}` | {r['start']} | {r['end']} | {r['samples']} | {clk} | {pw} |")
    with open(os.path.join(log_dir, "smi_clocks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(samples, stages, os.path.join(log_dir, "smi_clocks.png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
