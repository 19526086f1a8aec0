"""
One table and one bar chart of end-to-end trainer throughput gathered from several GPU calls
(bench_train JSONs, and rows copied from run logs whose files were lost), each row naming its source.

    python -m benchmarks.summarize_train benchmarks/results/train_bench_h100.json

The JSON holds {"meta": {...}, "results": [{depth, mode, tok_per_sec | tok_per_sec_range, mfu,
step_time_ms, peak_memory_gib, source, config?}, ...]}; rows compare with the dense row of the same
config (default "d<depth>"; e.g. "d20, 1 micro-batch"). Writes <json>.md and <json>.png beside it.
"""

import json
import sys

from benchmarks.bench_train import MODES


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
             "| config | mode | tok/s | vs dense | MFU (dense FLOPs) | step ms | peak mem GiB | source |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = next((d for d in rows if config(d) == config(r) and d["mode"] == "dense" and d.get("call") == r.get("call")
                      and d.get("tok_per_sec")), None)
        if r.get("tok_per_sec_range"):
            lo, hi = r["tok_per_sec_range"]
            tps = f"{lo:,.0f}–{hi:,.0f}"
        else:
            tps = fmt(r.get("tok_per_sec"), ",.0f")
        ratio = f"{tok_per_sec(r) / dense['tok_per_sec']:.3f}x" if dense and tok_per_sec(r) else "-"
        lines.append(f"| {config(r)} | {r['mode']} | {tps} | {ratio} | {fmt(r.get('mfu'), '.1f', '%')} | "
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
    ax.set_xticklabels(depths, fontsize=8)
    ax.set_ylim(0.8, 1.2)
    ax.set_ylabel("tokens/s relative to dense bf16")
    ax.set_title(data["meta"]["gpu"] + ", compiled", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".json"):
        sys.exit("usage: python -m benchmarks.summarize_train RESULTS.json")
    path = sys.argv[1]
    with open(path) as f:
        data = json.load(f)
    base = path[:-len(".json")]
    with open(base + ".md", "w") as f:
        f.write("\n".join(table(data)) + "\n")
    plot(data, base + ".png")
    print("\n".join(table(data)))


if __name__ == "__main__":
    main()
