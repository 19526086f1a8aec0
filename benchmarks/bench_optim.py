"""
Benchmark (not a test): the optimizer's share of a 1-micro-batch training step, per Muon variant:
  stacked     the step before sharding: every rank stacks, updates and copies back every gradient and
              momentum buffer, and orthogonalizes every matrix (the baseline)
  replicated  today's step in one process: foreach momentum, every matrix orthogonalized here
  sharded     today's step under DDP: each rank orthogonalizes its share, one all_gather per shape
The model, optimizers, DDP and compile are the trainer's (dense); the data are random tokens.

    python -m benchmarks.bench_optim --depth 20                                     # 1 GPU
    torchrun --standalone --nproc_per_node=2 -m benchmarks.bench_optim --depth 20   # 2 GPUs
    python -m benchmarks.bench_optim --device cpu --depth 2 --seq-len 64 --device-batch-size 2  # a CPU check

For each variant: the median over --steps steps (after --warmup) of fwd+bwd (DDP's gradient all-reduce
included), the optimizer step (AdamW and Muon) and the whole step, timed with CUDA events (the host clock
on CPU); on several ranks, the slowest rank's median. Writes optim_d<depth>_ws<world>.json (one row per
variant) and .md under --out.
"""

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from benchmarks import common_args as common
from nanochat.accel.converters import LinearConverter
from nanochat.common import compute_cleanup, compute_init, print0
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import Muon, setup_optimizers, zeropower_via_newtonschulz5
from nanochat.train import wrap_model

VARIANTS = ["stacked", "replicated", "sharded"]


class StackedMuon(Muon):
    """Muon's step before sharding (same math): one stack of each shape's gradients and buffers, copied back."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                grads = torch.stack([p.grad for p in params])
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = torch.stack([self.state[p]["momentum_buffer"] for p in params])
                buf.lerp_(grads, 1 - group["momentum"])
                update = grads.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz5(update, steps=group["ns_steps"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for i, p in enumerate(params):
                    self.state[p]["momentum_buffer"].copy_(buf[i])
                    if group["weight_decay"] > 0:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update[i].to(p.dtype), alpha=-group["lr"] * scale)


def make_optimizers(model, variant, device_type):
    """The trainer's [adamw, muon], with Muon as `variant` asks."""
    adamw, muon = setup_optimizers(model, device_type=device_type, shard_muon=variant == "sharded")
    if variant == "stacked":
        muon = StackedMuon([dict(g) for g in muon.param_groups])
    return [adamw, muon]


class Clock:
    """Time stamps on the device's timeline: CUDA events on a GPU, the host clock elsewhere."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end):
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def time_variant(model, train_model, opts, x, y, autocast_ctx, warmup, steps, device):
    """Medians (ms) of fwd+bwd, the optimizer step and the whole step, the slowest rank's."""
    clock = Clock(device)
    marks = []
    for i in range(warmup + steps):
        t0 = clock.mark()
        with autocast_ctx:
            loss = train_model(x, y)
        loss.backward()
        t1 = clock.mark()
        for opt in opts:
            opt.step()
        t2 = clock.mark()
        model.zero_grad(set_to_none=True)
        loss.item()  # the trainer waits for the device once per step too
        if i >= warmup:
            marks.append((t0, t1, t2))
    medians = [statistics.median(clock.ms(m[a], m[b]) for m in marks) for a, b in ((0, 1), (1, 2), (0, 2))]
    if dist.is_initialized():
        t = torch.tensor(medians, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        medians = t.tolist()
    return medians


def bench(args):
    """Returns one row per variant (the same on every rank)."""
    device_type = args.device
    is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config_from_depth(args.depth, args.vocab_size, args.seq_len))
    model.init_weights()
    train_model, _ = wrap_model(model, is_ddp, local_rank, device_type, LinearConverter(device), use_compile=use_compile)
    torch.manual_seed(rank)
    x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.seq_len), device=device)
    y = torch.randint(0, args.vocab_size, (args.device_batch_size, args.seq_len), device=device)

    launch = f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"
    meta = dict(gpu=torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu", torch=torch.__version__,
                date=datetime.date.today().isoformat(),
                command=f"{launch} -m benchmarks.bench_optim " + shlex.join(sys.argv[1:]))
    rows = []
    # with one process, sharded is replicated
    for variant in [v for v in args.muon if v != "sharded" or world_size > 1]:
        opts = make_optimizers(model, variant, device_type)
        fwd_bwd_ms, optimizer_ms, step_ms = time_variant(model, train_model, opts, x, y, autocast_ctx,
                                                         args.warm_steps, args.steps, device)
        rows.append(dict(depth=args.depth, mode="dense", micro_batches=1, world_size=world_size, muon=variant,
                         device_batch_size=args.device_batch_size, seq_len=args.seq_len, steps=args.steps,
                         fwd_bwd_ms=fwd_bwd_ms, optimizer_ms=optimizer_ms, step_ms=step_ms,
                         optimizer_share=optimizer_ms / step_ms,
                         tok_per_sec=args.device_batch_size * args.seq_len * world_size / step_ms * 1e3, **meta))
        print0(f"{variant}: fwd+bwd {fwd_bwd_ms:.1f} ms | optimizer {optimizer_ms:.1f} ms | step {step_ms:.1f} ms")
        del opts
        if device_type == "cuda":
            torch.cuda.empty_cache()
    compute_cleanup()
    return rows


def write_outputs(rows, out_dir):
    """optim_d<depth>_ws<world>.json and .md; returns the markdown lines."""
    r0 = rows[0]
    lines = [f"# Optimizer share of a 1-micro-batch step, d{r0['depth']}, {r0['world_size']} process(es) "
             f"({r0['gpu']}, torch {r0['torch']}, {r0['date']})", "",
             f"Command: `{r0['command']}`. Device batch {r0['device_batch_size']} x {r0['seq_len']}, "
             f"median of {r0['steps']} steps, the slowest rank.", "",
             "| muon | fwd+bwd ms | optimizer ms | step ms | optimizer share | tok/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['muon']} | {r['fwd_bwd_ms']:.1f} | {r['optimizer_ms']:.1f} | {r['step_ms']:.1f} | "
              f"{100 * r['optimizer_share']:.1f}% | {r['tok_per_sec']:,.0f} |" for r in rows]
    os.makedirs(out_dir, exist_ok=True)
    name = os.path.join(out_dir, f"optim_d{r0['depth']}_ws{r0['world_size']}")
    with open(name + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(name + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def build_arg_parser():
    p = common.parser(__doc__)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    common.add_depth(p, 20)
    common.add_device_batch_size(p)
    common.add_seq_len(p)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--muon", nargs="+", default=VARIANTS, choices=VARIANTS,
                   help="Muon variants to time (sharded only runs on more than one process)")
    common.add_warm_steps(p, 5)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    common.add_out(p, "out", "the output directory")
    return p


def main():
    args = build_arg_parser().parse_args()
    rows = bench(args)
    if int(os.environ.get("RANK", 0)) == 0:
        print("\n".join(write_outputs(rows, args.out)))


if __name__ == "__main__":
    main()
