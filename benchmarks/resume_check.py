"""
Kill-and-resume check (issue 13): a run whose launcher is killed with SIGKILL mid-way, resumed with
--resume-from-step, must follow the unbroken run's loss curve. Four runs of scripts.base_train, each a
subprocess with its own log (torchrun when --nproc > 1):
  base     the unbroken run: --save-every S --num-iterations I
  repeat   (--repeat-baseline) the same again under another tag: the machine's run-to-run noise
  killed   the same under a third tag, in its own session; at the step event of --kill-step the launcher's
           pid gets SIGKILL, as a user would send it. torchrun starts each worker in a session of its own,
           so its workers outlive it: they are found in the process table, watched for --orphan-wait s,
           then killed (each worker's group) and reported
  resumed  that tag again with --resume-from-step <its newest intact checkpoint>, to step I
Each run writes its events file (nanochat/metrics.py: EventLog) beside its log. The resumed run's loss at
every step after the resume point, its final val bpb and its final weights are compared with the base run's.
Passes when the losses' largest relative difference is <= --tolerance (default 0: identical values) and no
rank reported different 2:4 masks.

    python -m benchmarks.resume_check --nproc 2 --out /tmp/rc -- --device-type cpu --depth 2 --aspect-ratio 32 \\
        --head-dim 32 --max-seq-len 64 --device-batch-size 4 --total-batch-size 1024 --eval-tokens 512 --sample-every -1

On CPU every kernel is deterministic and the resumed run is bit-exact. On a GPU, pass --repeat-baseline: if the
two unbroken runs differ, some kernel is not deterministic (atomics-based reductions: flash attention's
backward, the compiled embedding backward's scatter-add; cuBLAS split-K only with a changing workspace) and a
relative tolerance like 1e-3 is the honest bar; --probe (on by default on CUDA) times nothing, it runs those
kernels twice on identical inputs and says which of them gave different bits.
Writes <out>.json, <out>.md, the logs (<out>_<run>.log) and events (<out>_<run>.events.jsonl). Exits 1 when the check fails, with a message
when a run it needs could not run.
"""

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time

from benchmarks import common_args as common
from nanochat import checkpoint
from nanochat.common import get_base_dir
from nanochat.metrics import read_events

# flags this script sets itself for each run
OWN_FLAGS = ("--save-every", "--num-iterations", "--model-tag", "--overwrite", "--resume-from-step", "--events")
# the error a run stops with when its ranks' 2:4 masks differ (nanochat/accel/converters.py: check_replicas)
MASK_ERROR = "ranks pruned different 2:4 masks"


def flag_value(flags, name, default=None):
    return flags[flags.index(name) + 1] if name in flags else default


def mode_of(flags):
    return {(False, False): "dense", (True, False): "sparse", (False, True): "fp8",
            (True, True): "fp8_sparse"}[("--sparse" in flags, "--fp8" in flags)]


def launcher(nproc):
    """The command that starts the trainer: torchrun (as its module, so no PATH lookup) for several processes."""
    if nproc == 1:
        return [sys.executable, "-m", "scripts.base_train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "scripts.base_train"]


def child_env():
    return dict(os.environ, PYTHONUNBUFFERED="1")


def run_to_end(cmd, log_path, timeout):
    """Runs cmd with its output in log_path. Returns (exit code or 'timeout', seconds)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p.pid)
            p.wait()
            rc = "timeout"
    return rc, time.time() - t0


# -----------------------------------------------------------------------------
# Processes: the launcher's descendants and who outlives it

def process_table():
    """{pid: (ppid, pgid, state, command)} of every process, from ps (Linux and macOS)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,pgid=,stat=,args="], capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) >= 4:
            table[int(parts[0])] = (int(parts[1]), int(parts[2]), parts[3], parts[4] if len(parts) > 4 else "")
    return table


def descendants(pid, table):
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, row in table.items() if row[0] == parent]
        found += children
        frontier += children
    return sorted(found)


def alive(pids):
    """Those of pids still running (not zombies)."""
    table = process_table()
    return [p for p in pids if p in table and not table[p][2].startswith("Z")]


def kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def step_events(events_path):
    """The step events written so far (none before the file exists)."""
    return read_events(events_path, "step") if os.path.exists(events_path) else []


def kill_at_step(cmd, log_path, events_path, checkpoint_dir, kill_step, orphan_wait, timeout):
    """Starts cmd in its own session, SIGKILLs the launcher's pid once the events show step kill_step, watches its
    descendants for orphan_wait seconds, then kills the groups of those still running. Returns what happened."""
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        while True:
            done = step_events(events_path)
            if any(e["step"] == kill_step for e in done):
                break
            if p.poll() is not None or time.time() - t0 > timeout:
                kill_group(p.pid)
                raise RuntimeError(f"the run to be killed ended (exit {p.poll()}) or timed out before step {kill_step}: "
                                   f"see {log_path}")
            time.sleep(0.02)
        table = process_table()
        tree = descendants(p.pid, table)
        alive_at_kill = [pid for pid in tree if not table[pid][2].startswith("Z")]
        saved_at_kill = set(checkpoint.saved_steps(checkpoint_dir))
        os.kill(p.pid, signal.SIGKILL)  # the launcher only, as `kill -9 <pid>` would
        p.wait()
        killed_at = time.time()
        survivors = alive(tree)
        # do the orphans exit by themselves (e.g. on losing the launcher's store)?
        while survivors and time.time() - killed_at < orphan_wait:
            time.sleep(0.1)
            survivors = alive(survivors)
        exited_alone = sorted(set(alive_at_kill) - set(survivors))
        for pgid in sorted({table[pid][1] for pid in survivors} | {p.pid}):
            kill_group(pgid)  # the launcher's session group, and each worker's own (torchrun gives each a session)
        deadline = time.time() + 10
        while alive(survivors) and time.time() < deadline:
            time.sleep(0.1)
    steps_after = [e["step"] for e in step_events(events_path)[len(done):]]
    saved_after = sorted(set(checkpoint.saved_steps(checkpoint_dir)) - saved_at_kill)
    return dict(
        launcher_pid=p.pid,
        descendants={pid: table[pid][3][:160] for pid in tree},
        alive_at_kill=alive_at_kill,
        exited_by_themselves=exited_alone,
        orphaned=survivors,  # still running orphan_wait seconds after the launcher died; then killed here
        orphan_wait_s=orphan_wait,
        still_alive_after_cleanup=alive(survivors),
        orphan_last_step=max(steps_after) if steps_after else None,
        orphan_saved_steps=saved_after,
        seconds=killed_at - t0,
    )


# -----------------------------------------------------------------------------
# Events, logs and checkpoints

def log_tail(log_path):
    with open(log_path) as f:
        return f.read()[-1500:]


def read_run(events_path, log_path):
    """One run's curve and set-up from its events; from its log only the error a failed run printed."""
    events = read_events(events_path) if os.path.exists(events_path) else []
    start = next((e for e in reversed(events) if e["event"] == "start"), {})
    val = {e["step"]: e["val_bpb"] for e in events if e["event"] == "val"}
    sparse_ddp = start.get("world_size", 1) > 1 and start.get("converter", {}).get("sparse_layers", 0) > 0
    with open(log_path) as f:
        text = f.read()
    return dict(
        loss={e["step"]: (e["loss"], e["smooth_loss"]) for e in events if e["event"] == "step"},
        val=val,
        micro_batches=start.get("micro_batches"),
        mask_error=MASK_ERROR in text,
        mask_checks=len(val) if sparse_ddp else 0,  # under DDP each evaluation first checks the ranks' 2:4 masks
        kernels=start.get("kernel_choices", []),
        warnings=start.get("warnings", []),  # e.g. --sparse on CPU trains dense
        tail=text[-1500:],
    )


def compare_curves(ref, other, after_step, last_step):
    """Losses at steps after_step+1..last_step and the val bpb evaluations after after_step; bit-exact also needs
    the smoothed losses (carried in the checkpoint) identical. Missing steps count as a failure."""
    steps = list(range(after_step + 1, last_step + 1))
    missing = [s for s in steps if s not in ref["loss"] or s not in other["loss"]]
    pairs = [(float(ref["loss"][s][0]), float(other["loss"][s][0])) for s in steps if s not in missing]
    diffs = [abs(a - b) for a, b in pairs]
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in pairs]
    differing = [s for s in steps if s not in missing and ref["loss"][s] != other["loss"][s]]
    val_steps = [s for s in ref["val"] if s > after_step]
    val_differing = [s for s in val_steps if ref["val"][s] != other["val"].get(s)]
    val_rel = [abs(float(ref["val"][s]) - float(other["val"][s])) / float(ref["val"][s])
               for s in val_steps if s in other["val"]]
    val_a, val_b = ref["val"].get(last_step), other["val"].get(last_step)
    return dict(steps=len(steps), missing_steps=missing,
                max_abs_diff=max(diffs) if diffs else None, max_rel_diff=max(rel) if rel else None,
                bit_exact=not missing and not differing and not val_differing, val_steps_differing=val_differing,
                val_max_rel_diff=max(val_rel) if val_rel else None,
                first_differing_step=differing[0] if differing else None,
                val_bpb_ref=val_a, val_bpb=val_b,
                val_bpb_abs_diff=abs(float(val_a) - float(val_b)) if val_a and val_b else None)


def compare_weights(tag_a, tag_b, step):
    """The final model weights of two tags: largest absolute difference and whether every tensor is identical."""
    import torch
    root = os.path.join(get_base_dir(), "base_checkpoints")
    a, _, _ = checkpoint.load_checkpoint(os.path.join(root, tag_a), step, "cpu", load_optimizer=False)
    b, _, _ = checkpoint.load_checkpoint(os.path.join(root, tag_b), step, "cpu", load_optimizer=False)
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return dict(weights_max_abs_diff=diff, weights_bit_exact=all(torch.equal(a[k], b[k]) for k in a))


# -----------------------------------------------------------------------------
# Which kernels are not deterministic: each run twice on identical inputs

def probe_determinism(flags):
    """{kernel: True if two calls on identical inputs gave identical bits} for the CUDA kernels whose
    reductions may use atomics or split-K. The shapes are the trainer's (one micro-batch, its width)."""
    import torch
    import torch.nn.functional as F
    from nanochat.gpt import config_from_depth
    depth = int(flag_value(flags, "--depth", 20))
    T = int(flag_value(flags, "--max-seq-len", 2048))
    B = int(flag_value(flags, "--device-batch-size", 32))
    cfg = config_from_depth(depth, 32768, T, int(flag_value(flags, "--aspect-ratio", 64)),
                            int(flag_value(flags, "--head-dim", 128)))
    D, H, hd = cfg.n_embd, cfg.n_head, cfg.n_embd // cfg.n_head
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)

    def same_twice(fn):
        a, b = fn(), fn()
        return all(torch.equal(x, y) for x, y in zip(a, b))

    ids = torch.randint(0, 32768, (B, T), device=dev, generator=g)
    emb = torch.randn(32768, D, device=dev, generator=g)
    g_emb = torch.randn(B, T, D, device=dev, generator=g)
    q, k, v = (torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    g_att = torch.randn(B, H, T, hd, device=dev, dtype=torch.bfloat16, generator=g)
    x = torch.randn(B * T, D, device=dev, dtype=torch.bfloat16, generator=g)
    gy = torch.randn(B * T, 4 * D, device=dev, dtype=torch.bfloat16, generator=g)

    def embedding_backward(fn):
        w = emb.clone().requires_grad_()
        fn(ids, w).backward(g_emb)
        return [w.grad]

    def sdpa_backward():
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        F.scaled_dot_product_attention(qq, kk, vv, is_causal=True).backward(g_att)
        return [qq.grad, kk.grad, vv.grad]

    compiled_embedding = torch.compile(F.embedding, dynamic=False)
    probes = {
        "embedding backward (eager)": lambda: embedding_backward(F.embedding),
        "embedding backward (torch.compile: Inductor scatter-add)": lambda: embedding_backward(compiled_embedding),
        "scaled_dot_product_attention backward (bf16, causal)": sdpa_backward,
        "bf16 matmul weight gradient (cuBLAS, K = tokens)": lambda: [gy.t() @ x],
    }
    result = {}
    for name, fn in probes.items():
        try:
            result[name] = same_twice(fn)
        except Exception as e:  # a probe that cannot run says so and the check goes on
            result[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return result


# -----------------------------------------------------------------------------

def machine(flags):
    import torch
    on_cuda = flag_value(flags, "--device-type", "") != "cpu" and torch.cuda.is_available()
    return (torch.cuda.get_device_name() if on_cuda else "cpu"), torch.__version__, on_cuda


def write_outputs(out, meta, row):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=[row]), f, indent=2)
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    fmt_bpb = lambda v: "-" if v is None else f"{float(v):.4f}"
    k = row["kill"]
    lines = [f"# Kill-and-resume check ({meta['gpu']}, torch {meta['torch']}, {meta['date']})", "",
             f"Command: `{meta['command']}`", "",
             "| depth | mode | nproc | micro-batches | kill step | resume step | steps compared | max abs diff | "
             "max rel diff | bit-exact | final weights bit-exact | val bpb (base / resumed) | run-to-run max abs diff | passed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {row['depth']} | {row['mode']} | {row['nproc']} | {row['micro_batches']} | {row['kill_step']} | "
             f"{row['resume_step']} | {row['steps_compared']} | {fmt(row['max_abs_diff'])} | {fmt(row['max_rel_diff'])} | "
             f"{row['bit_exact']} | {row.get('weights_bit_exact', '-')} | {fmt_bpb(row['val_bpb_ref'])} / {fmt_bpb(row['val_bpb'])} | "
             f"{fmt(row['baseline_noise']['max_abs_diff']) if row.get('baseline_noise') else 'not measured'} | "
             f"{row['passed']} |", "",
             f"Killed: SIGKILL to the launcher (pid {k['launcher_pid']}) at its step event {row['kill_step']}; "
             f"{len(k['alive_at_kill'])} descendant processes were running; "
             + (f"{len(k['orphaned'])} of them (pids {', '.join(map(str, k['orphaned']))}) were still running "
                f"{k['orphan_wait_s']} s later, orphaned (the log reached step {k['orphan_last_step']}"
                + (f", they saved checkpoint steps {k['orphan_saved_steps']}" if k['orphan_saved_steps'] else "")
                + "), and were killed by this script (each one's process group)."
                if k["orphaned"] else "none outlived it.")]
    if row.get("probe"):
        lines += ["", "Determinism probe (each kernel twice on identical inputs):", ""]
        lines += [f"- {name}: {'deterministic' if r is True else 'NOT deterministic' if r is False else r}"
                  for name, r in row["probe"].items()]
    if row["warnings"]:
        lines += ["", "The trainer warned: " + "; ".join(row["warnings"])]
    if row.get("kernel_choices_differ"):
        lines += ["", "The runs chose different kernels: " + json.dumps(row["kernel_choices_differ"])]
    if row["failures"]:
        lines += ["", "Failed: " + "; ".join(row["failures"])]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def build_arg_parser():
    p = common.parser(__doc__)
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun when > 1)")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--num-iterations", type=int, default=None, help="default 3 x --save-every")
    p.add_argument("--kill-step", type=int, default=None, help="default halfway between the first two saves")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="largest relative loss difference that passes (0: identical values; ~1e-3 on a GPU "
                        "whose kernels are not deterministic: measure with --repeat-baseline)")
    p.add_argument("--repeat-baseline", action="store_true", help="run the unbroken run twice: run-to-run noise")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, default=None,
                   help="run the determinism probe of single kernels (default: on for CUDA)")
    p.add_argument("--orphan-wait", type=float, default=2.0,
                   help="seconds to watch the killed launcher's workers before killing them")
    p.add_argument("--tag", default=None, help="checkpoint tag prefix (default resume_check_<mode>)")
    common.add_timeout(p, 1800)
    common.add_out(p, "out/resume_check_{device}_g{nproc}_d{depth}_{mode}",
                   "path prefix of the outputs; {device}, {nproc}, {depth} and {mode} are filled in")
    p.add_argument("trainer_flags", nargs=argparse.REMAINDER, help="-- then scripts.base_train flags")
    return p


def main():
    p = build_arg_parser()
    args = p.parse_args()
    flags = args.trainer_flags[1:] if args.trainer_flags[:1] == ["--"] else args.trainer_flags
    own = [f for f in OWN_FLAGS if f in flags]
    if own:
        p.error(f"{', '.join(own)}: set by this script (use its --save-every/--num-iterations/--tag)")
    S = args.save_every
    I = args.num_iterations or 3 * S
    K = args.kill_step or S + max(1, S // 2)
    if not (S >= 1 and S < K < I):
        p.error(f"need 1 <= --save-every < --kill-step < --num-iterations (got {S}, {K}, {I})")
    mode = mode_of(flags)
    tag = args.tag or f"resume_check_{mode}"
    gpu, torch_version, on_cuda = machine(flags)
    depth = int(flag_value(flags, "--depth", 20))
    args.out = args.out.format(device="gpu" if on_cuda else "cpu", nproc=args.nproc, depth=depth, mode=mode)

    names = ("base", "repeat", "killed", "resumed")
    logs = {name: f"{args.out}_{name}.log" for name in names}
    events = {name: f"{args.out}_{name}.events.jsonl" for name in names}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for path in events.values():  # a resumed run appends: a file of an earlier check must not mix in
        if os.path.exists(path):
            os.remove(path)

    def cmd(name, run_tag, *extra):
        return launcher(args.nproc) + flags + ["--save-every", str(S), "--num-iterations", str(I),
                                               "--model-tag", run_tag, "--events", events[name], *extra]

    commands = dict(base=cmd("base", f"{tag}_base", "--overwrite"), killed=cmd("killed", f"{tag}_killed", "--overwrite"))
    if args.repeat_baseline:
        commands["repeat"] = cmd("repeat", f"{tag}_repeat", "--overwrite")
    failures, seconds = [], {}

    for name in ("base", "repeat"):
        if name in commands:
            rc, seconds[name] = run_to_end(commands[name], logs[name], args.timeout)
            print(f"{name}: exit {rc} in {seconds[name]:.0f}s", flush=True)
            if rc != 0:
                sys.exit(f"the {name} run failed (exit {rc}), see {logs[name]}:\n{log_tail(logs[name])}")

    killed_dir = os.path.join(get_base_dir(), "base_checkpoints", f"{tag}_killed")
    kill = kill_at_step(commands["killed"], logs["killed"], events["killed"], killed_dir, K, args.orphan_wait, args.timeout)
    print(f"killed: launcher SIGKILLed at step {K} after {kill['seconds']:.0f}s; orphaned workers: "
          f"{kill['orphaned'] or 'none'}" + (f" (reached step {kill['orphan_last_step']}, killed here)"
                                             if kill["orphaned"] else ""), flush=True)
    intact = checkpoint.intact_steps(killed_dir)
    if not intact or intact[-1] >= I:
        sys.exit(f"no checkpoint to resume from below step {I} in {killed_dir} (intact: {intact}): "
                 + ("the orphaned workers finished the run; lower --orphan-wait or raise --num-iterations"
                    if intact else "the kill came before the first save"))
    R = intact[-1]
    commands["resumed"] = cmd("resumed", f"{tag}_killed", "--resume-from-step", str(R))
    rc, seconds["resumed"] = run_to_end(commands["resumed"], logs["resumed"], args.timeout)
    print(f"resumed from step {R}: exit {rc} in {seconds['resumed']:.0f}s", flush=True)
    if rc != 0:
        failures.append(f"the resumed run failed (exit {rc}), see {logs['resumed']}")

    parsed = {name: read_run(events[name], logs[name]) for name in commands}
    curve = compare_curves(parsed["base"], parsed["resumed"], R, I)
    row = dict(depth=depth, mode=mode, nproc=args.nproc,
               micro_batches=parsed["base"]["micro_batches"], save_every=S, num_iterations=I, kill_step=K,
               resume_step=R, steps_compared=curve.pop("steps"), **curve, tolerance=args.tolerance)
    if rc == 0:
        row.update(compare_weights(f"{tag}_base", f"{tag}_killed", I))
    if "repeat" in parsed:
        noise = compare_curves(parsed["base"], parsed["repeat"], 0, I)
        row["baseline_noise"] = dict(max_abs_diff=noise["max_abs_diff"], max_rel_diff=noise["max_rel_diff"],
                                     bit_exact=noise["bit_exact"], first_differing_step=noise["first_differing_step"],
                                     **compare_weights(f"{tag}_base", f"{tag}_repeat", I))
        row["within_noise"] = (row["max_abs_diff"] or 0) <= (noise["max_abs_diff"] or 0)
    if args.probe or (args.probe is None and on_cuda):
        try:
            row["probe"] = probe_determinism(flags)
        except Exception as e:  # the comparison above stands without it
            row["probe"] = {"probe": f"could not run: {type(e).__name__}: {str(e).splitlines()[0][:160]}"}

    if row["missing_steps"]:
        failures.append(f"steps missing from a log: {row['missing_steps'][:10]}")
    elif row["max_rel_diff"] is not None and row["max_rel_diff"] > args.tolerance:
        failures.append(f"loss differs after resume: max rel diff {row['max_rel_diff']:.3g} > --tolerance "
                        f"{args.tolerance} (first at step {row['first_differing_step']})")
    if row["val_max_rel_diff"] is not None and row["val_max_rel_diff"] > args.tolerance:
        failures.append(f"val bpb differs after resume: max rel diff {row['val_max_rel_diff']:.3g} > --tolerance "
                        f"{args.tolerance} (steps {row['val_steps_differing']})")
    if args.tolerance == 0 and row.get("weights_bit_exact") is False:
        failures.append("the final weights differ")
    for name, log in parsed.items():
        if log["mask_error"]:
            failures.append(f"the {name} run's ranks pruned different 2:4 masks")
    kernels = {name: log["kernels"] for name, log in parsed.items()}
    if len({json.dumps(v) for v in kernels.values()}) > 1:
        row["kernel_choices_differ"] = kernels  # a timing-based kernel choice changed between runs
    if kill["still_alive_after_cleanup"]:
        failures.append(f"processes {kill['still_alive_after_cleanup']} survived SIGKILL")
    row["warnings"] = parsed["base"]["warnings"]
    row.update(passed=not failures, failures=failures, mask_checks={n: l["mask_checks"] for n, l in parsed.items()},
               kill=kill, seconds=seconds, gpu=gpu, torch=torch_version,
               commands={name: shlex.join(c) for name, c in commands.items()},
               logs=logs, events={name: events[name] for name in commands})
    meta = dict(date=datetime.date.today().isoformat(), gpu=gpu, torch=torch_version,
                command="python -m benchmarks.resume_check " + shlex.join(sys.argv[1:]))
    print("\n".join(write_outputs(args.out, meta, row)))
    sys.exit(0 if row["passed"] else 1)


if __name__ == "__main__":
    main()
