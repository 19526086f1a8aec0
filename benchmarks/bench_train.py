"""
End-to-end training throughput of the real trainer (nanochat.train's setup() and train_step(), compiled, real
data, the loss read every step) for dense, --sparse, --fp8 and --fp8 --sparse, with the GPU's SM clock,
power, energy per step and temperature in every row (benchmarks/gpu_monitor.py).

The GPU trains at its power cap, so its clock follows the load, the die temperature and how long the load has
lasted: a ratio between modes depends on how it is measured. Two methods (--method):

  interleaved  every mode set up in ONE process. A heat soak (--soak-seconds of short blocks cycling the
               modes) brings the GPU to its steady temperature; then --rounds rounds of one block of
               --block-seconds per mode, the order reversed every other round (ABBA...). The first
               --drop-steps steps of each block are dropped. A mode's ratio to the first mode is the
               geometric mean over rounds of (first mode's block median step / this mode's), min and max
               alongside: both modes of a round see the same GPU state, and drift cancels across rounds.
  process      one process per mode (what a user runs), --seconds of training after its --drop-steps
               first steps and --settle-seconds of settling; the trace (tok/s, clock, power, temperature per
               30 s window, settling included) shows the first minute against the rest.

    python -m benchmarks.bench_train --depths 20 --modes dense sparse --micro-batches 4
    python -m benchmarks.bench_train --method process --seconds 300 --depths 20 --modes dense sparse

Needs data shards and a tokenizer under NANOCHAT_BASE_DIR (benchmarks/gpu.sh sets that up on a GPU machine).
Writes <out>.json (every step's time stamps and the GPU samples too), <out>.md and <out>.png. Which kernel each
op got comes from each trainer's start event (nanochat/metrics.py: EventLog).
"""

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common_args as common
from benchmarks.gpu_monitor import GpuMonitor, window_stats

# sparse: what --sparse chooses (2:4 GEMMs where a whole-step record shows them paying, nanochat/accel/step_gate.py);
# sparse_24 / sparse_masked: the 2:4 GEMMs forced on / off
MODES = {"dense": [], "sparse": ["--sparse"], "sparse_24": ["--sparse", "--sparse-backend", "cusparselt"],
         "sparse_masked": ["--sparse", "--sparse-backend", "masked"], "fp8": ["--fp8"], "fp8_sparse": ["--fp8", "--sparse"],
         "fp8_sparse_24": ["--fp8", "--sparse", "--sparse-backend", "cusparselt"],
         "fp8_all": ["--fp8", "--fp8-layers", "all"], "fp8_sparse_all": ["--fp8", "--sparse", "--fp8-layers", "all"]}
DEFAULT_MODES = ["dense", "sparse", "fp8", "fp8_sparse"]  # the *_all modes compare against the per-layer fp8 choice


# Variants of a --sparse step for bisecting what it costs ("MODE+VARIANT", e.g. "sparse+frozen"), applied after
# the trainer's set-up and before the first (compiling) step.
def _frozen(layers):
    """Packed once at set-up; no re-pack after optimizer steps (the 2:4 GEMMs run on stale operands)."""
    for m in layers:
        m.refresh = lambda force=False: False
        m.stale = lambda: False  # eager forward (no compile) runs on them as they are


def _ops_dense(layers):
    """The library, plans and compressors set up as --sparse does, but every op dense on the masked weight."""
    for m in layers:
        m.kernel.configure(None, None)
        m.refresh(force=True)


VARIANTS = {"frozen": _frozen, "ops_dense": _ops_dense}


def mode_choice(text):
    """--modes entry: a MODES key, optionally +VARIANT."""
    base, _, variant = text.partition("+")
    if base not in MODES or (variant and variant not in VARIANTS):
        raise argparse.ArgumentTypeError(f"unknown mode {text!r}: one of {', '.join(MODES)}, optionally "
                                         f"+{'/+'.join(VARIANTS)}")
    return text
LONG_RUN_STEPS = 1_000_000  # the lr schedule's horizon in a benchmark: warmup, then a flat lr for as long as it runs
TRACE_WINDOW_S = 30.0


def trainer_flags(depth, mode, steps, device_batch_size, seq_len, total_batch_size):
    return ["--depth", str(depth), "--device-batch-size", str(device_batch_size), "--max-seq-len", str(seq_len),
            "--total-batch-size", str(total_batch_size), "--num-iterations", str(steps), "--warmup-steps", "5",
            "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--model-tag", f"bench_d{depth}_{mode.replace('+', '_')}", *MODES[mode.partition("+")[0]]]


# -----------------------------------------------------------------------------
# The schedule and the statistics (no GPU needed: tests drive them with a fake step)

def schedule(modes, rounds, soak_seconds, soak_block_seconds):
    """[(mode, seconds, kind)] in order: soak blocks cycling the modes, then `rounds` rounds of one block per mode,
    every other round reversed (A B, B A, A B, ...) so that a drift in time does not favour any mode."""
    plan = []
    n_soak = math.ceil(soak_seconds / soak_block_seconds) if soak_seconds > 0 else 0
    for i in range(n_soak):
        plan.append((modes[i % len(modes)], soak_block_seconds, "soak"))
    for r in range(rounds):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            plan.append((m, None, f"round{r}"))
    return plan


def run_schedule(plan, step_fn, block_seconds, clock=time.time):
    """Runs step_fn(mode) back to back, block after block of `plan`, for each block's seconds (None =
    block_seconds). Returns the steps as dicts (mode, block, kind, t0, t1)."""
    steps = []
    for block, (mode, seconds, kind) in enumerate(plan):
        end = clock() + (block_seconds if seconds is None else seconds)
        while True:
            t0 = clock()
            step_fn(mode)
            t1 = clock()
            steps.append(dict(mode=mode, block=block, kind=kind, t0=t0, t1=t1))
            if t1 >= end:
                break
    return steps


def kept_blocks(steps, drop_steps):
    """{block: (mode, kind, [kept steps])}: each block without its first drop_steps steps (the switch to a
    mode, and its compile or cache warm-up, land there)."""
    blocks = {}
    for s in steps:
        blocks.setdefault(s["block"], (s["mode"], s["kind"], []))[2].append(s)
    return {b: (m, k, ss[drop_steps:]) for b, (m, k, ss) in blocks.items() if len(ss) > drop_steps}


def median_ms(ss):
    return 1000 * statistics.median(s["t1"] - s["t0"] for s in ss)


def block_rows(steps, samples, drop_steps):
    """One row per block: mode, kind, steps kept, median step ms, and the GPU's state over the kept steps."""
    rows = []
    for b, (mode, kind, ss) in sorted(kept_blocks(steps, drop_steps).items()):
        t0, t1 = ss[0]["t0"], ss[-1]["t1"]
        gpu = window_stats(samples, t0, t1)
        joules = gpu["energy_w"] * (t1 - t0) / len(ss) if gpu["energy_w"] is not None else None
        rows.append(dict(block=b, mode=mode, kind=kind, steps=len(ss), step_ms=median_ms(ss), t0=t0, t1=t1,
                         joules_per_step=joules, **{k: v for k, v in gpu.items() if k != "samples"}))
    return rows


def mode_summary(blocks, modes, tokens_per_step):
    """Per mode over the measured (non-soak) blocks: median step and tok/s, the GPU's state, and the ratio of
    tok/s to the first mode's as the geometric mean over rounds of the block-median ratios (min, max)."""
    measured = [b for b in blocks if b["kind"] != "soak"]
    rounds = sorted({b["kind"] for b in measured})
    base = modes[0]
    out = {}
    for m in modes:
        mine = [b for b in measured if b["mode"] == m]
        if not mine:
            continue
        ratios = []
        for r in rounds:
            a = [b["step_ms"] for b in measured if b["kind"] == r and b["mode"] == base]
            x = [b["step_ms"] for b in measured if b["kind"] == r and b["mode"] == m]
            if a and x:
                ratios.append(a[0] / x[0])
        step_ms = statistics.median(b["step_ms"] for b in mine)

        def mean_of(key):
            vals = [b[key] for b in mine if b.get(key) is not None]
            return statistics.fmean(vals) if vals else None

        out[m] = dict(step_ms=step_ms, tok_per_sec=tokens_per_step / (step_ms / 1000), blocks=len(mine),
                      steps=sum(b["steps"] for b in mine),
                      ratio=math.exp(statistics.fmean(math.log(r) for r in ratios)) if ratios else None,
                      ratio_min=min(ratios) if ratios else None, ratio_max=max(ratios) if ratios else None,
                      sm_mhz=mean_of("sm_mhz"), power_w=mean_of("power_w"), joules_per_step=mean_of("joules_per_step"),
                      temp_c=mean_of("temp_c"), mem_temp_c=mean_of("mem_temp_c"), power_capped=mean_of("power_capped"),
                      power_inst_w=mean_of("power_inst_w"), power_inst_p95_w=mean_of("power_inst_p95_w"),
                      other_slowdown=mean_of("other_slowdown"))
    return out


def trace(steps, samples, tokens_per_step, window_s=TRACE_WINDOW_S):
    """Per mode, per window of window_s seconds from the mode's first step: tok/s (median step), SM clock,
    power and temperature. For the process method: the first minute against the rest."""
    out = {}
    for mode in dict.fromkeys(s["mode"] for s in steps):
        ss = [s for s in steps if s["mode"] == mode]
        start, rows = ss[0]["t0"], []
        while True:
            lo = start + len(rows) * window_s
            w = [s for s in ss if lo <= s["t0"] < lo + window_s]
            if not w:
                break
            gpu = window_stats(samples, w[0]["t0"], w[-1]["t1"])
            rows.append(dict(t=len(rows) * window_s, steps=len(w), tok_per_sec=tokens_per_step / (median_ms(w) / 1000),
                             sm_mhz=gpu["sm_mhz"], power_w=gpu["power_w"], temp_c=gpu["temp_c"]))
        out[mode] = rows
    return out


# -----------------------------------------------------------------------------
# The child process: trainers set up, the schedule run

def child(spec_path, out_path):
    import torch
    import torch._dynamo.config as dynamo_config
    from nanochat.common import gpu_peak_flops
    from nanochat.flags import build_arg_parser
    from nanochat.metrics import read_events
    from nanochat.train import TrainBatches, setup, train_step

    with open(spec_path) as f:
        spec = json.load(f)
    # one compiled graph set per model: several models in one process must not hit dynamo's recompile limit
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with dynamo_config.patch({limit: max(64, getattr(dynamo_config, limit))}):
        trainers, info = {}, {}
        for i, mode in enumerate(spec["modes"]):
            t = time.time()
            events = os.path.join(os.path.dirname(out_path), f"events_{i}.jsonl")  # the start event: which kernel each op got
            run = setup(build_arg_parser().parse_args(spec["flags"][mode] + ["--events", events]))
            variant = mode.partition("+")[2]
            if variant:
                from nanochat.accel.sparse import sparse_layers
                VARIANTS[variant](sparse_layers(run.model))
            trainers[mode] = [run, TrainBatches(run.loader), 0]
            info[mode] = dict(flops_per_token=run.flops_per_token, num_params=run.num_params, setup_s=time.time() - t,
                              tokens_per_step=run.total_batch_size, micro_batches=run.grad_accum_steps,
                              kernel_choice=read_events(events, "start")[-1]["kernel_choices"])

        losses = {m: [] for m in trainers}

        def step(mode):
            tr = trainers[mode]
            run, batches, n = tr
            run.sync()
            loss, _ = train_step(run, batches, n)  # reads the loss: a host sync every step, as the trainer does
            run.sync()
            tr[2] += 1
            losses[mode].append(loss)

        for mode in trainers:  # compile, autotune and warm each mode before anything is timed
            t = time.time()
            for _ in range(spec["warm_steps"]):
                step(mode)
            info[mode]["warm_s"] = time.time() - t
        plan = [tuple(p) for p in spec["plan"]]
        steps = run_schedule(plan, step, spec["block_seconds"])
        peak = gpu_peak_flops(next(iter(trainers.values()))[0].device)
        with open(out_path, "w") as f:
            json.dump(dict(steps=steps, info=info, peak_flops=peak, final_loss={m: l[-1] for m, l in losses.items()},
                           peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None), f)


def run_child(spec, log_path, timeout):
    """One child process; returns its JSON, or raises RuntimeError with the end of its log. Its output is
    appended to log_path under a header line: one log for all children keeps a run's files few (a GPU
    machine may hand back only a handful)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path, child_log = (os.path.join(tmp, name) for name in ("spec.json", "out.json", "child.log"))
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        try:
            with open(child_log, "w") as log:
                r = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--child", spec_path, out_path],
                                   stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout)
            failed = r.returncode != 0 and f"exit code {r.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout}s"
        with open(child_log) as f:
            text = f.read()
        with open(log_path, "a") as log:
            log.write(f"===== {' '.join(spec['modes'])}: {' '.join(spec['flags'][spec['modes'][0]])}\n{text}")
        if failed:
            raise RuntimeError(f"{failed}: " + text[-1500:])
        with open(out_path) as f:
            return json.load(f)


# -----------------------------------------------------------------------------
# Outputs

def steady_from_events(steps, skip=10):
    """Steady-state numbers from a trainer run's step events (nanochat/metrics.py: EventLog): the median of the
    steps after the 10th. None if no steady step."""
    steady = [e for e in steps if e["step"] > skip]
    if not steady:
        return None
    mfus = [e["mfu"] for e in steady if e["mfu"] is not None]
    tps = [e["tok_per_sec"] for e in steady]
    return dict(tok_per_sec=statistics.median(tps), tok_per_sec_mean=sum(tps) / len(tps),
                step_time_ms=statistics.median(1000 * e["dt"] for e in steady),
                mfu=statistics.median(mfus) if mfus else None, peak_memory_gib=steps[-1]["peak_memory_gib"],
                steps_logged=len(steps))


def fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def markdown(meta, rows, traces, results=()):
    lines = [f"# Training throughput ({meta['gpu']}, torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, {meta['date']})", "",
             f"Command: `{meta['command']}`", "", f"Method: {meta['method_text']}", "",
             "| depth | micro-batches | mode | tok/s | vs first mode (min-max) | MFU % | step ms | SM MHz | W | W instant (p95) "
             "| J/step | GPU C | mem C | power-capped / other slowdown |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['depth']} | {r['micro_batches']} | {r['mode']} | failed: {r['error'][:100]} |||||||||||")
            continue
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}x ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})"
        lines.append(f"| {r['depth']} | {r['micro_batches']} | {r['mode']} | {r['tok_per_sec']:,.0f} | {ratio} | "
                     f"{fmt(r['mfu'], '.1f')} | {r['step_ms']:.1f} | {fmt(r['sm_mhz'], '.0f')} | {fmt(r['power_w'], '.0f')} | "
                     f"{fmt(r.get('power_inst_w'), '.0f')} ({fmt(r.get('power_inst_p95_w'), '.0f')}) | "
                     f"{fmt(r['joules_per_step'], '.1f')} | {fmt(r['temp_c'], '.1f')} | {fmt(r['mem_temp_c'], '.1f')} | "
                     f"{fmt(r.get('power_capped'), '.2f')} / {fmt(r.get('other_slowdown'), '.2f')} |")
    for res in results:
        for mode, info in res.get("info", {}).items():
            if info.get("kernel_choice"):
                lines += ["", f"Kernels, {res['key']} {mode} (the trainer's start event):", ""] + [f"- {c}" for c in info["kernel_choice"]]
    for key, modes in traces.items():
        lines += ["", f"Trace, {key} (per {TRACE_WINDOW_S:.0f} s window from the mode's first timed step):", "",
                  "| mode | t s | steps | tok/s | SM MHz | W | GPU C |", "|---|---|---|---|---|---|---|"]
        for mode, ws in modes.items():
            for w in ws:
                lines.append(f"| {mode} | {w['t']:.0f} | {w['steps']} | {w['tok_per_sec']:,.0f} | {fmt(w['sm_mhz'], '.0f')} | "
                             f"{fmt(w['power_w'], '.0f')} | {fmt(w['temp_c'], '.1f')} |")
    return lines


def plot(samples, results, path):
    """SM clock, power and temperature over the whole benchmark, the measured blocks shaded by mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not samples:
        return
    t0 = samples[0]["t"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    for ax, key, label in zip(axes, ("sm_mhz", "power_w", "temp_c"), ("SM MHz", "power W", "GPU C")):
        ax.plot([s["t"] - t0 for s in samples], [s[key] for s in samples], lw=0.6, color="k")
        ax.set_ylabel(label)
        colors = {}
        for res in results:
            for b in res["blocks"]:
                c = colors.setdefault(b["mode"], f"C{len(colors)}")
                ax.axvspan(b["t0"] - t0, b["t1"] - t0, color=c, alpha=0.15 if b["kind"] != "soak" else 0.05,
                           label=b["mode"] if key == "sm_mhz" and b["mode"] not in ax.get_legend_handles_labels()[1] else None)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------

def build_arg_parser():
    p = common.parser(__doc__)
    p.add_argument("--method", choices=["interleaved", "process"], default="process")
    common.add_depths(p, [20])
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, type=mode_choice,
                   help=f"the first is the baseline; one of {', '.join(MODES)}, optionally +VARIANT ({', '.join(VARIANTS)})")
    common.add_micro_batches(p, [4], several=True)
    common.add_device_batch_size(p)
    p.add_argument("--device-batch-size-d26", type=int, default=None, help="override for depth >= 26 (memory)")
    common.add_seq_len(p)
    common.add_warm_steps(p, 12)
    p.add_argument("--drop-steps", type=int, default=2, help="steps dropped at the start of each block")
    p.add_argument("--soak-seconds", type=float, default=60, help="interleaved: heat soak before the rounds")
    p.add_argument("--soak-block-seconds", type=float, default=10)
    p.add_argument("--block-seconds", type=float, default=20, help="interleaved: one mode's block in a round")
    p.add_argument("--rounds", type=int, default=4, help="interleaved: rounds of one block per mode")
    p.add_argument("--seconds", type=float, default=300, help="process: measured seconds per mode, after the settling")
    p.add_argument("--settle-seconds", type=float, default=60,
                   help="process: seconds of training before the measured ones (in the trace, not in the median)")
    common.add_trainer_flags(p)
    p.add_argument("--gpu-index", type=int, default=0, help="the NVML index of the GPU the runs use")
    common.add_timeout(p, 3600)
    common.add_out(p, "out/train_bench")
    p.add_argument("--rebuild", metavar="JSON", help="run nothing: rows, markdown and plot again from this JSON")
    p.add_argument("--child", nargs=2, metavar=("SPEC_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    return p


def main():
    args = build_arg_parser().parse_args()
    if args.child:
        child(*args.child)
        return
    if args.rebuild:
        rebuild(args.rebuild, args.drop_steps)
        return

    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, gpu=gpu,
                cusparselt=torch.backends.cusparselt.version() if torch.cuda.is_available() else None,
                command="python -m benchmarks.bench_train " + shlex.join(sys.argv[1:]), method=args.method)
    if args.method == "interleaved":
        meta["method_text"] = (f"interleaved in one process: {args.soak_seconds:.0f} s heat soak, {args.rounds} rounds of "
                               f"{args.block_seconds:.0f} s per mode (order reversed every other round), first "
                               f"{args.drop_steps} steps of each block dropped; median step per mode; ratio = geometric "
                               f"mean over rounds")
    else:
        meta["method_text"] = (f"one process per mode: {args.warm_steps} warm-up steps, {args.settle_seconds:.0f} s of training "
                               f"(in the trace only), then {args.seconds:.0f} s measured; median step")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    results = []
    with GpuMonitor(args.gpu_index) as mon:
        if mon.error:
            print(f"Warning: no GPU samples ({mon.error})", flush=True)
        for depth in args.depths:
            B = args.device_batch_size_d26 if (depth >= 26 and args.device_batch_size_d26) else args.device_batch_size
            for mb in args.micro_batches:
                flags = {m: trainer_flags(depth, m, LONG_RUN_STEPS, B, args.seq_len, B * args.seq_len * mb) + args.trainer_flags.split()
                         for m in args.modes}
                key = f"d{depth}_mb{mb}"
                if args.method == "interleaved":
                    specs = [dict(modes=args.modes, flags=flags, warm_steps=args.warm_steps, block_seconds=args.block_seconds,
                                  plan=schedule(args.modes, args.rounds, args.soak_seconds, args.soak_block_seconds))]
                else:
                    settle = args.settle_seconds > 0
                    specs = [dict(modes=[m], flags={m: flags[m]}, warm_steps=args.warm_steps, block_seconds=args.seconds,
                                  plan=[(m, args.settle_seconds, "soak")] * settle + [(m, None, "round0")]) for m in args.modes]
                result = dict(key=key, depth=depth, micro_batches=mb, device_batch_size=B, modes=args.modes, steps=[], info={})
                results.append(result)
                for spec in specs:
                    try:
                        out = run_child(spec, f"{args.out}_children.log", args.timeout)
                    except RuntimeError as e:
                        result["error"] = str(e).strip().splitlines()[-1][:200]
                        print(f"{key}: FAILED {result['error']}", flush=True)
                        break
                    # block ids are per child: renumber so blocks of separate processes stay apart
                    offset = max((s["block"] for s in result["steps"]), default=-1) + 1
                    result["steps"] += [dict(s, block=s["block"] + offset) for s in out["steps"]]
                    result["info"].update(out["info"])
                    result["peak_flops"] = out["peak_flops"]
                    dump(args.out, meta, results, mon.samples)  # after every child: a cut-off run keeps what it measured
    rows, traces = summarize(results, samples=mon.samples, drop_steps=args.drop_steps, method=args.method, meta=meta)
    write_outputs(args.out, meta, results, mon.samples, rows, traces)


def dump(out, meta, results, samples, rows=None, traces=None):
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, traces=traces, results=results, samples=samples), f)


def summarize(results, samples, drop_steps, method, meta):
    """Result rows (one per configuration and mode) and, for the process method, the traces over time."""
    rows, traces = [], {}
    for res in results:
        base = dict(depth=res["depth"], micro_batches=res["micro_batches"], device_batch_size=res["device_batch_size"],
                    gpu=meta["gpu"], date=meta["date"], method=method, command=meta["command"])
        if res.get("error"):
            rows += [dict(base, mode=m, error=res["error"]) for m in res["modes"]]
            continue
        info = res["info"]
        tokens = info[res["modes"][0]]["tokens_per_step"]
        res["blocks"] = block_rows(res["steps"], samples, drop_steps)
        if method == "process":
            traces[res["key"]] = trace(res["steps"], samples, tokens)
        for m, s in mode_summary(res["blocks"], res["modes"], tokens).items():
            peak = res.get("peak_flops")
            mfu = 100 * info[m]["flops_per_token"] * s["tok_per_sec"] / peak if peak else None
            rows.append(dict(base, mode=m, mfu=mfu, setup_s=info[m]["setup_s"], warm_s=info[m]["warm_s"], **s))
    return rows, traces


def write_outputs(out, meta, results, samples, rows, traces):
    dump(out, meta, results, samples, rows, traces)
    lines = markdown(meta, rows, traces, results)
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(samples, results, out + ".png")
    print("\n".join(lines))


def rebuild(path, drop_steps):
    """Rows, markdown and plot again from a JSON of this benchmark (also one cut off before its summary)."""
    with open(path) as f:
        data = json.load(f)
    meta = data["meta"]
    rows, traces = summarize(data["results"], data["samples"], drop_steps, meta["method"], meta)
    write_outputs(path[:-len(".json")], meta, data["results"], data["samples"], rows, traces)


if __name__ == "__main__":
    main()
