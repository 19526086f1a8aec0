"""
One table and one bar chart of end-to-end trainer throughput gathered from several GPU calls
(bench_train JSONs, and rows copied from run logs whose files were lost), each row naming its source.

    python -m benchmarks.summarize_train benchmarks/results/train_fp8_layers_h200.json
    python -m benchmarks.summarize_train --gather OUT.json --meta META.json A.json=LABEL [B.json=LABEL ...]

--gather builds OUT.json from bench_train JSONs: rows of the same LABEL form one config (one GPU, or GPUs named
in the label), and where a trainer run's events file lies beside its JSON (<json>_d<depth>_<mode>.events.jsonl,
e.g. from gpu.sh's ddp stage) the row's numbers are recomputed from its step events (bench_train.steady_from_events:
the median of the steps after the 10th). META.json holds title, about, notes.

The JSON holds {"meta": {...}, "results": [{depth, mode, tok_per_sec | tok_per_sec_range, mfu,
step_time_ms, peak_memory_gib, source, config?}, ...]}; rows compare with the dense row of the same
config (default "d<depth>"; e.g. "d20, 1 micro-batch"). Writes <json>.md and <json>.png beside it.
"""

import json
import os
import sys

from benchmarks.bench_train import MODES, steady_from_events
from nanochat.metrics import read_events


def fmt(v, spec, suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def tok_per_sec(r):
    lo_hi = r.get("tok_per_sec_range")
    return r.get("tok_per_sec") or (sum(lo_hi) / 2 if lo_hi else None)


def config(r):
    return r.get("config", f"d{r['depth']}")


def table(data):
    meta, rows = data["meta"], data["results"]
    lines = [f"# {meta['title']}", "", meta["about"], "",
             "| config | mode | tok/s | vs dense | vs fp8 | MFU (dense FLOPs) | step ms | peak mem GiB | source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def same(mode):
            return next((d for d in rows if config(d) == config(r) and d["mode"] == mode and d.get("call") == r.get("call")
                         and d.get("tok_per_sec")), None)
        dense, fp8 = same("dense"), same("fp8")
        if r.get("tok_per_sec_range"):
            lo, hi = r["tok_per_sec_range"]
            tps = f"{lo:,.0f}–{hi:,.0f}"
        else:
            tps = fmt(r.get("tok_per_sec"), ",.0f")
        ratio = f"{tok_per_sec(r) / dense['tok_per_sec']:.3f}x" if dense and tok_per_sec(r) else "-"
        vs_fp8 = f"{tok_per_sec(r) / fp8['tok_per_sec']:.3f}x" if fp8 and tok_per_sec(r) and r["mode"] == "fp8_sparse" else "-"
        lines.append(f"| {config(r)} | {r['mode']} | {tps} | {ratio} | {vs_fp8} | {fmt(r.get('mfu'), '.1f', '%')} | "
                     f"{fmt(r.get('step_time_ms'), '.0f')} | {fmt(r.get('peak_memory_gib'), '.2f')} | {r['source']} |")
    return lines + [""] + ["- " + n for n in meta.get("notes", [])]


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in data["results"] if tok_per_sec(r) and not r.get("superseded")]
    with_dense = {config(r) for r in rows if r["mode"] == "dense"}
    rows = [r for r in rows if config(r) in with_dense]  # bars are relative to their config's dense row
    depths = list(dict.fromkeys(config(r) for r in rows))  # configs, in the file's order
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for i, mode in enumerate(modes):
        for j, d in enumerate(depths):
            r = next((r for r in rows if config(r) == d and r["mode"] == mode), None)
            if not r:
                continue
            dense = next(x for x in rows if config(x) == d and x["mode"] == "dense")
            y = tok_per_sec(r) / tok_per_sec(dense)
            err = None
            if r.get("tok_per_sec_range"):  # a range read off the step lines: show it
                lo, hi = (v / tok_per_sec(dense) for v in r["tok_per_sec_range"])
                err = [[y - lo], [hi - y]]
            ax.bar(j + i * width, y, width, yerr=err, capsize=3, color=f"C{list(MODES).index(mode)}",
                   label=mode if j == next(k for k, dd in enumerate(depths) if any(
                       config(x) == dd and x["mode"] == mode for x in rows)) else None)
    ax.axhline(1.0, color="k", lw=0.8)
    for y, label in data["meta"].get("targets", []):
        ax.axhline(y, color="tab:red", lw=0.8, ls="--", label=label)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(depths))])
    ax.set_xticklabels([d.replace(", ", "\n", 2) for d in depths], fontsize=7)  # config, micro-batches, source
    ax.set_ylim(0.8, 1.2)
    ax.set_ylabel("tokens/s relative to dense bf16")
    ax.set_title(data["meta"]["gpu"] + ", compiled", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gather(sources, meta):
    """The combined results of bench_train JSONs [(path, label)], each row's numbers from its events file where it
    exists."""
    rows = []
    for path, label in sources:
        with open(path) as f:
            data = json.load(f)
        for r in data["results"]:
            row = {k: v for k, v in r.items() if k != "log_tail"}
            events = f"{path[:-len('.json')]}_d{r['depth']}_{r['mode']}.events.jsonl"
            steady = steady_from_events(read_events(events, "step")) if os.path.exists(events) else None
            if steady:
                row.update(steady)
            mb = r.get("micro_batches", r.get("grad_accum"))
            row.update(config=f"d{r['depth']}, {mb} micro-batch{'es' if mb != 1 else ''}, {label}", call=label,
                       source=f"{label}: `{data['meta']['command'].replace('python -m benchmarks.bench_train ', 'bench_train ')}`")
            rows.append(row)
    return dict(meta=meta, results=rows)


def render(path):
    with open(path) as f:
        data = json.load(f)
    base = path[:-len(".json")]
    with open(base + ".md", "w") as f:
        f.write("\n".join(table(data)) + "\n")
    plot(data, base + ".png")
    print("\n".join(table(data)))


def main():
    args = sys.argv[1:]
    if args[:1] == ["--gather"] and len(args) >= 5 and args[2] == "--meta" and args[1].endswith(".json"):
        with open(args[3]) as f:
            meta = json.load(f)
        sources = [tuple(a.split("=", 1)) for a in args[4:]]
        if any(len(s) != 2 or not s[0].endswith(".json") for s in sources):
            sys.exit("error: sources are BENCH.json=LABEL")
        with open(args[1], "w") as f:
            json.dump(gather(sources, meta), f, indent=1)
        render(args[1])
    elif len(args) == 1 and args[0].endswith(".json"):
        render(args[0])
    else:
        sys.exit("usage: python -m benchmarks.summarize_train RESULTS.json | --gather OUT.json --meta META.json A.json=LABEL ...")

if __name__ == "__main__":
    main()
