"""
Profile (not a test): where one optimizer step's time goes, per mode, from torch.profiler. The model,
conversions, optimizers and re-pack hooks are the trainer's; the data are random tokens (no loader).

    python -m benchmarks.profile_step --depth 20 --modes dense sparse --micro-batches 4 [--out DIR]

For each mode: wall ms per step, GPU busy ms per step (kernel time, one stream), the GPU time of each
kernel class (dense GEMMs, 2:4 GEMMs, the re-pack, fp8 casts and scales, attention, Triton
elementwise, the optimizer, other) and the top kernels. Writes profile_<depth>.json/.md under --out.
"""

import datetime
import json
import os
import shlex
import sys
import time

import torch

from benchmarks import common_args as common
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import setup_optimizers

# kernel-name fragments of each class, first match wins. Triton kernels are named after the ops they fuse
# (a cast fused into an rms-norm, or into the input of a sparse GEMM), so they are classed on their own.
TRITON_CLASSES = [
    ("fp8 casts / amax / scales", ("amax", "float8", "fp8")),
    ("Triton / elementwise", ("",)),
]
CLASSES = [
    ("2:4 GEMM (cuSPARSELt / CUTLASS sparse)", ("sparse", "sp_gemm", "spmma", "_sp_")),
    ("re-pack (mask, compress)", ("semi_structured", "compress", "tile", "gather")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("dense GEMM", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "matmul", "wgmma")),
    ("fp8 casts / amax / scales", ("amax", "float8", "fp8", "scale")),
    ("optimizer", ("foreach", "multi_tensor", "adam", "lerp")),
    ("Triton / elementwise", ("triton", "elementwise", "vectorized", "reduce")),
]


def kernel_class(name):
    low = name.lower()
    for cls, keys in TRITON_CLASSES if low.startswith("triton") else CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def build(depth, mode, tokens, grad_accum, device, vocab=32768, seq_len=2048):
    """The model and optimizers as the trainer builds them (nanochat/train.py: build_converter, setup)."""
    from nanochat.accel.converters import LinearConverter
    from nanochat.accel.kernel_choice import default_timing_cache
    torch.manual_seed(0)
    config = config_from_depth(depth, vocab, seq_len)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    log = lambda m: print("  " + m, flush=True)
    converter = LinearConverter(device, sparse=mode in ("sparse", "fp8_sparse"), fp8=mode in ("fp8", "fp8_sparse"),
                                tokens=tokens, micro_batches=grad_accum, timing_cache=default_timing_cache(log), log=log)
    converter.convert(model)
    opts = setup_optimizers(model, 0.2, 0.004, 0.02, 0.0, "cuda")
    for opt in opts:
        opt.register_step_post_hook(lambda *_: converter.post_optimizer_hook(model))
    return model, opts


def profile_mode(depth, mode, B, grad_accum, warmup_steps, steps, seq_len=2048):
    from torch.profiler import ProfilerActivity, profile
    device = torch.device("cuda")
    model, opts = build(depth, mode, B * seq_len, grad_accum, device, seq_len=seq_len)
    cmodel = torch.compile(model, dynamic=False)
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (B, seq_len), device=device)
    y = torch.randint(0, vocab, (B, seq_len), device=device)

    def step():
        for _ in range(grad_accum):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cmodel(x, y)
            (loss / grad_accum).backward()
        with torch.profiler.record_function("optimizer_step"):  # both optimizers and the re-pack hooks
            for opt in opts:
                opt.step()
        model.zero_grad(set_to_none=True)
        return loss.item()  # the trainer syncs once per step too

    for _ in range(warmup_steps):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
    kernels = {}
    for e in prof.key_averages():
        t = e.self_device_time_total
        marker = getattr(e, "is_user_annotation", False) or "#" in e.key or e.key == "Command Buffer Full"
        if t > 0 and e.device_type == torch.autograd.DeviceType.CUDA and not marker:  # what the GPU ran
            kernels[e.key] = (t / 2e3, e.count / 2)  # ms and calls per step
    busy = sum(t for t, _ in kernels.values())
    # GPU time of every kernel launched inside the optimizer-step range (its Newton-Schulz GEMMs too)
    optimizer_ms = sum(e.device_time_total for e in prof.key_averages()
                       if e.key == "optimizer_step" and e.device_type == torch.autograd.DeviceType.CPU) / 2e3
    classes = {}
    for name, (t, _) in kernels.items():
        c = kernel_class(name)
        classes[c] = classes.get(c, 0.0) + t
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model, opts, cmodel
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return dict(depth=depth, mode=mode, device_batch_size=B, micro_batches=grad_accum, wall_ms=wall_ms,
                tok_per_sec=B * seq_len * grad_accum / wall_ms * 1e3, gpu_busy_ms=busy, optimizer_step_ms=optimizer_ms,
                classes=dict(sorted(classes.items(), key=lambda kv: -kv[1])),
                top_kernels=[dict(name=n[:120], ms=t, calls=c) for n, (t, c) in top], peak_memory_gib=peak)


def build_arg_parser():
    p = common.parser(__doc__)
    common.add_depth(p, 20)
    common.add_modes(p, ["dense", "sparse"], choices=["dense", "sparse", "fp8", "fp8_sparse"])
    common.add_device_batch_size(p)
    common.add_micro_batches(p, 4)
    common.add_warm_steps(p, 4)
    p.add_argument("--steps", type=int, default=5, help="profiled steps per mode")
    common.add_out(p, "out", "the output directory")
    return p


def main():
    args = build_arg_parser().parse_args()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=datetime.date.today().isoformat(),
                command="python -m benchmarks.profile_step " + shlex.join(sys.argv[1:]))
    rows = []
    name = f"profile_d{args.depth}_mb{args.micro_batches}"
    for mode in args.modes:
        r = profile_mode(args.depth, mode, args.device_batch_size, args.micro_batches, args.warm_steps, args.steps)
        rows.append(r)
        lines = [f"# Step profile, d{args.depth}, device batch {args.device_batch_size}, {args.micro_batches} micro-batches "
                 f"({meta['gpu']}, torch {meta['torch']}, {meta['date']})", "", f"Command: `{meta['command']}`", ""]
        for r2 in rows:
            lines += [f"## {r2['mode']}: {r2['wall_ms']:.1f} ms wall per step ({r2['tok_per_sec']:,.0f} tok/s), "
                      f"GPU busy {r2['gpu_busy_ms']:.1f} ms ({100 * r2['gpu_busy_ms'] / r2['wall_ms']:.1f}%), "
                      f"peak {r2['peak_memory_gib']:.1f} GiB", "",
                      f"Optimizer step (AdamW, Muon with its Newton-Schulz GEMMs, the re-pack hooks): "
                      f"{r2['optimizer_step_ms']:.1f} GPU ms per step, {100 * r2['optimizer_step_ms'] / r2['wall_ms']:.1f}% of the wall time. "
                      "The classes below split all kernels by name (the optimizer's GEMMs count as dense GEMMs).", "",
                      "| kernel class | GPU ms per step |", "|---|---|"]
            lines += [f"| {c} | {t:.2f} |" for c, t in r2["classes"].items()]
            lines += ["", "| top kernels | ms per step | calls per step |", "|---|---|---|"]
            lines += [f"| `{k['name'][:90]}` | {k['ms']:.2f} | {k['calls']:.0f} |" for k in r2["top_kernels"]]
            lines.append("")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=1)
        with open(os.path.join(args.out, name + ".md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{mode}: wall {r['wall_ms']:.1f} ms, GPU busy {r['gpu_busy_ms']:.1f} ms, optimizer step {r['optimizer_step_ms']:.1f} ms; " +
              ", ".join(f"{c} {t:.1f}" for c, t in r["classes"].items()), flush=True)


if __name__ == "__main__":
    main()
