"""
Where a training run's numbers go: the log lines (through a tqdm bar on a terminal), the events file (one JSON
object a line, for benchmarks and tools), the history train() returns, wandb, and at the end the summary and
the report (finish).
"""

import json
import os
import re
import resource
import sys
import time

import torch

from nanochat.common import UserError, compute_cleanup, device_name, get_base_dir, gpu_peak_flops, print0


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB: host RSS


EVENTS_FILE = "events.jsonl"  # in the checkpoint directory, unless --events names a path


class EventLog:
    """The run's events, one JSON object a line, written to `path` and flushed line by line (None: writes
    nothing, as on ranks other than 0); a fresh run replaces the file, a resumed one (append) adds to it. Every event has "event" and "time" (Unix seconds):
      start  once per start of the trainer: step (0, or the step resumed from), args, model_config, world_size,
             device, device_type, torch, num_params, flops_per_token, total_batch_size (tokens per optimizer
             step, all processes), micro_batches, num_iterations, converter (what a checkpoint records of
             --sparse/--fp8), plan ({layer: "FORMAT PRECISION"} of the layers the converter changed, e.g.
             "2:4 fp8"), kernel_choices (the converter's lines saying whether the 2:4 GEMMs run at all and which
             kernel each op or layer shape runs, with the timings behind it), warnings (the converter's warnings)
      step   after each optimizer step: step (1-based), loss, smooth_loss, lrm, dt (seconds), tok_per_sec, mfu
             (percent, null without a known peak), peak_memory_gib (GPU: allocated; CPU: the process's RSS)
      val    step, val_bpb
    Each run's events begin with its start event."""

    def __init__(self, path, append=False):
        self.file = None
        if path:
            try:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                self.file = open(path, "a" if append else "w")
            except OSError as e:
                raise UserError(f"cannot write the events file {path} ({e.strerror}): pass --events a writable path")

    def write(self, event, **fields):
        if self.file:
            self.file.write(json.dumps(dict(event=event, time=time.time(), **fields)) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


def read_events(path, event=None):
    """The events of an events file, in order (only those named `event` if given)."""
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    return [e for e in events if event is None or e["event"] == event]


# the converter's lines that say which kernel an op or layer shape runs (nanochat/accel/sparse/convert.py, fp8.py),
# and whether the 2:4 GEMMs run at all (nanochat/accel/step_gate.py: off, no op is tuned and no other line says so)
KERNEL_CHOICE = re.compile(r"^(2:4 GEMMs o(n|ff): |2:4 kernels for |fp8 2:4 kernels for |fp8: \d+ layers of weight )")


class SetupLog:
    """The converter's log: each line printed (rank 0) and kept for the start event."""

    def __init__(self, log=print0):
        self.log, self.lines = log, []

    def __call__(self, line):
        self.log(line)
        self.lines.append(line)

    def kernel_choices(self):
        return [line for line in self.lines if KERNEL_CHOICE.match(line)]

    def warnings(self):
        return [line for line in self.lines if line.startswith("Warning")]


def write_start(run, setup_log):
    """The start event: what the run is (its flags, model, world size, device) and which kernels it chose."""
    run.events.write("start", step=run.start_step, args=vars(run.args), model_config=run.model.config.to_dict(),
                     world_size=run.world_size, device=device_name(run.device), device_type=run.device_type,
                     torch=torch.__version__, num_params=run.num_params, flops_per_token=run.flops_per_token,
                     total_batch_size=run.total_batch_size, micro_batches=run.grad_accum_steps,
                     num_iterations=run.num_iterations, converter=run.converter.meta(),
                     plan={name: f"{p.format} {p.precision}" for name, p in run.converter.plan.items()},
                     kernel_choices=setup_log.kernel_choices(), warnings=setup_log.warnings())


def start_wandb(args):
    """The wandb run --run names, or None with one warning line: a missing wandb or login never stops training."""
    try:
        import wandb
    except ImportError:
        print0(f"Warning: --run {args.run} logs to wandb, which is not installed (pip install -e '.[wandb]'): "
               f"training without it")
        return None
    try:
        return wandb.init(project="nanochat-sparse", name=args.run, config=vars(args))
    except Exception as e:  # no login, no network: wandb.init's errors vary by version
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        print0(f"Warning: --run {args.run}: wandb.init failed ({type(e).__name__}: {first}): training without "
               f"wandb (`wandb login`, or WANDB_MODE=offline to log locally)")
        return None


class Metrics:
    """Where the run's numbers go: the log (through the progress bar on a terminal), the events file
    (run.events), the history that train() returns, and wandb. Holds the smoothed loss and train time
    (continued on resume) and the latest val bpb, CORE and samples, for checkpoints and the summary."""

    def __init__(self, run):
        args = run.args
        self.run = run
        self.peak_flops = gpu_peak_flops(run.device)
        self.wandb_run = None
        if args.run != "dummy" and run.master:
            self.wandb_run = start_wandb(args)
        self.history = dict(step=[], loss=[], val_step=[], val_bpb=[], core_step=[], core_metric=[], tok_per_sec=[], mfu=[])
        self.smooth_loss = run.loop_state.get("smooth_loss", 0.0)
        self.total_train_time = run.loop_state.get("total_train_time", 0.0)
        self.val_bpb, self.core, self.samples = None, None, []
        self.bar, self.log = None, print0
        if sys.stdout.isatty() and run.master:
            from tqdm import tqdm
            self.bar = tqdm(total=run.num_iterations, initial=run.start_step, dynamic_ncols=True, leave=False)
            self.log = self.bar.write

    def log_val(self, step, val_bpb):
        self.val_bpb = val_bpb
        self.history["val_step"].append(step)
        self.history["val_bpb"].append(val_bpb)
        self.log(f"step {step:05d} | val bpb {val_bpb:.4f}")
        self.run.events.write("val", step=step, val_bpb=val_bpb)
        if self.wandb_run:
            self.wandb_run.log({"step": step, "val/bpb": val_bpb})

    def log_core(self, step, core):
        self.core = core
        self.history["core_step"].append(step)
        self.history["core_metric"].append(core["core_metric"])
        self.log(f"step {step:05d} | CORE {core['core_metric']:.4f} ({core['seconds']:.1f}s)")
        if self.wandb_run:
            self.wandb_run.log({"step": step, "core_metric": core["core_metric"],
                                **{f"core/{k}": r["centered"] for k, r in core["tasks"].items()}})

    def log_samples(self, samples):
        self.samples = samples
        for s in samples:
            self.log(f"sample: {s!r}")

    def log_step(self, step, train_loss, lrm, dt):
        """The step line and the step event after optimizer step `step` (1-based) took dt seconds.
        Returns the smoothed loss."""
        run = self.run
        ema = 0.9
        self.smooth_loss = ema * self.smooth_loss + (1 - ema) * train_loss
        debiased = self.smooth_loss / (1 - ema ** step)
        tok_per_sec = run.total_batch_size / dt
        mfu = 100 * run.flops_per_token * tok_per_sec / (self.peak_flops * run.world_size) if self.peak_flops else None
        if step > run.start_step + 10:
            self.total_train_time += dt  # the first steps include compilation
        eta = (run.num_iterations - step) * dt
        mfu_str = f"{mfu:.1f}%" if mfu is not None else "-"
        mem = peak_memory_gib(run.device)
        self.log(f"step {step:05d}/{run.num_iterations:05d} | loss {train_loss:.4f} (smooth {debiased:.4f}) | "
                 f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu_str} | "
                 f"mem {mem:.2f}GiB | eta {duration(eta)}")
        run.events.write("step", step=step, loss=train_loss, smooth_loss=debiased, lrm=lrm, dt=dt,
                         tok_per_sec=tok_per_sec, mfu=mfu, peak_memory_gib=mem)
        self.history["step"].append(step)
        self.history["loss"].append(train_loss)
        self.history["tok_per_sec"].append(tok_per_sec)
        self.history["mfu"].append(mfu)
        if self.bar:
            self.bar.update(1)
        if self.wandb_run:
            self.wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm,
                                "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        return debiased

    def loop_state(self):
        """Saved with each checkpoint, for a resumed run's smoothed loss and train time."""
        return dict(smooth_loss=self.smooth_loss, total_train_time=self.total_train_time, val_bpb=self.val_bpb)

    def summary(self):
        """The run's final numbers; throughput and MFU average the steps after the first 10 (compilation)."""
        run, history, core = self.run, self.history, self.core
        steady = history["tok_per_sec"][10:] or history["tok_per_sec"]
        steady_mfu = history["mfu"][10:]
        return dict(
            val_bpb=self.val_bpb, core_metric=core["core_metric"] if core else None, core=core,
            core_step=history["core_step"][-1] if core else None,
            final_loss=history["loss"][-1] if history["loss"] else None,
            tok_per_sec=sum(steady) / len(steady) if steady else None,
            mfu=(sum(m for m in steady_mfu if m) / max(1, len(steady_mfu))) if self.peak_flops else None,
            peak_memory_gib=peak_memory_gib(run.device), num_iterations=run.num_iterations, num_params=run.num_params,
            flops_per_token=run.flops_per_token, num_sparse_layers=run.converter.meta().get("sparse_layers", 0),
            world_size=run.world_size, device=device_name(run.device),
            torch_version=torch.__version__, checkpoint_dir=run.checkpointer.dir, samples=self.samples,
            total_train_time=self.total_train_time,
        )


def duration(seconds):
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.2f}m"


def finish(run, metrics):
    """The done line and the report; closes the progress bar, wandb and the process group.
    Returns train()'s dict."""
    if metrics.bar:
        metrics.bar.close()
    summary = metrics.summary()
    val_str = f"{metrics.val_bpb:.4f}" if metrics.val_bpb is not None else "-"
    print0(f"done: val bpb {val_str} | peak memory {summary['peak_memory_gib']:.2f}GiB | "
           f"train time {duration(metrics.total_train_time)} (after the first 10 steps)")
    if run.master:
        from nanochat.report import write_train_report
        path = write_train_report(os.path.join(get_base_dir(), "report"), run.model_tag, vars(run.args),
                                  metrics.history, summary)
        print0(f"report: {path}")
    if metrics.wandb_run:
        metrics.wandb_run.finish()
    run.events.close()
    compute_cleanup()
    return dict(history=metrics.history, summary=summary)
