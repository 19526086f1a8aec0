"""MLP forward+backward (c_fc -> relu^2 -> c_proj), compiled, fp32 master weights under bf16
autocast, as the trainer runs it. Columns: bf16 dense, fp8 dense (torchao float8, tensorwise and
rowwise), fp8 2:4 (Fp8SparseKernel, tensorwise: the trainer's). Not a test.
Static shapes: one compile per (d, T, variant); results are rewritten after every row.

python -m benchmarks.bench_mlp_fp8 [--dims 768,1280,1664,2048] [--tokens 16384,32768,65536]
Writes out/mlp_fp8_bench.json and .md (or under --out).
"""

import datetime
import json
import os
import shlex
import sys

import torch

from benchmarks import common_args as common
from nanochat.gpt import MLP as GPTMLP, GPTConfig
from nanochat.accel.fp8 import convert_to_float8
from nanochat.accel.sparse import SemiSparseLinear, SparseRuntime
from nanochat.accel.sparse.fp8_kernel import Fp8SparseKernel


def MLP(d):
    """The model's own MLP block (c_fc -> relu² -> c_proj) at width d."""
    return GPTMLP(GPTConfig(n_embd=d))


def make(variant, d, device):
    torch.manual_seed(0)
    mlp = MLP(d).to(device)
    if variant in ("fp8_tensorwise", "fp8_rowwise"):
        convert_to_float8(mlp, device, log=lambda *a: None, recipe=variant.split("_")[1])
    elif variant == "fp8_24":
        runtime = SparseRuntime(device)
        for name in ("c_fc", "c_proj"):  # the trainer's own layer with the fp8 2:4 kernel
            layer = SemiSparseLinear.from_linear(getattr(mlp, name), Fp8SparseKernel(
                getattr(mlp, name).out_features, getattr(mlp, name).in_features, device, runtime))
            layer.refresh(force=True)  # pack before compiling: the compiled forward does not refresh
            setattr(mlp, name, layer)
    return mlp


VARIANTS = ["bf16", "fp8_tensorwise", "fp8_rowwise", "fp8_24"]
SPARSE = ("fp8_24",)


def build_arg_parser():
    p = common.parser(__doc__)
    p.add_argument("--dims", default="768,1280,1664,2048")
    p.add_argument("--tokens", default="16384,32768,65536")
    p.add_argument("--variants", default=",".join(VARIANTS))
    common.add_out(p, "out", "the output directory")
    p.add_argument("--profile", action="store_true", help="print a kernel-time breakdown instead of timing")
    p.add_argument("--dynamic", action="store_true", help="mark T dynamic (fewer compiles, slower fp8 reductions)")
    return p


def main():
    args = build_arg_parser().parse_args()
    from triton.testing import do_bench
    import torchao

    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    dims = [int(v) for v in args.dims.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    variants = args.variants.split(",")
    rows = []
    meta = dict(gpu=torch.cuda.get_device_name(device), torch=torch.__version__, torchao=torchao.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m benchmarks.bench_mlp_fp8 " + shlex.join(sys.argv[1:]),
                timing="triton.testing.do_bench median, fwd+bwd incl. grad-input of c_fc, torch.compile"
                       + (", mark_dynamic(T)" if args.dynamic else ", static shapes"))
    os.makedirs(args.out, exist_ok=True)
    for d in dims:
        for variant in variants:
            mlp = make(variant, d, device)
            cmlp = torch.compile(mlp, dynamic=False if not args.dynamic else None)
            pack_ms = None
            if variant.startswith("fp8_24"):  # per optimizer step: mask + quantize + pack both layers
                pack_ms = do_bench(lambda: [m.refresh(force=True) for m in (mlp.c_fc, mlp.c_proj)], warmup=10, rep=50, return_mode="median")
            for T in tokens:
                x = torch.randn(T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                if args.dynamic:
                    torch._dynamo.mark_dynamic(x, 0)
                gy = torch.randn(T, d, device=device, dtype=torch.bfloat16)

                def step():
                    x.grad = None
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        y = cmlp(x)
                    y.backward(gy)

                if args.profile:
                    profile(step, f"d={d} T={T} {variant}", args.out)
                    continue
                try:
                    ms = do_bench(step, warmup=50, rep=200, return_mode="median")
                    err = None
                except Exception as e:  # keep the table going; the error is recorded
                    ms, err = None, f"{type(e).__name__}: {str(e)[:200]}"
                    print(f"d={d} T={T} {variant}: {err}", file=sys.stderr)
                rows.append(dict(d=d, T=T, variant=variant, ms=ms, pack_ms=pack_ms, error=err))
                print(f"d={d:5d} T={T:6d} {variant:16s} {ms if ms is None else round(ms, 3)} ms", flush=True)
                del x, gy
            del mlp, cmlp
            torch._dynamo.reset()
            torch.cuda.empty_cache()
            if not args.profile:
                write(args.out, meta, rows, dims, tokens, variants)
    if not args.profile:
        print(write(args.out, meta, rows, dims, tokens, variants))


def profile(step, tag, out_dir):
    """CUDA kernel time per kernel over 10 steps: where the time goes besides the GEMMs."""
    from torch.profiler import ProfilerActivity
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
    with open(os.path.join(out_dir, "mlp_fp8_profile.txt"), "a") as f:
        f.write(f"## {tag} (10 steps)\n{text}\n")
    print(f"## {tag} (10 steps)\n{text}", flush=True)


def write(out_dir, meta, rows, dims, tokens, variants):
    with open(os.path.join(out_dir, "mlp_fp8_bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    md = table(meta, rows, dims, tokens, variants)
    with open(os.path.join(out_dir, "mlp_fp8_bench.md"), "w") as f:
        f.write(md)
    return md


def table(meta, rows, dims, tokens, variants):
    get = {(r["d"], r["T"], r["variant"]): r for r in rows}
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"# MLP fwd+bwd, fp8 ({meta['gpu']}, torch {meta['torch']}, torchao {meta['torchao']}, {meta['date']})", "",
             f"`{meta['command']}`; {meta['timing']}. ms.", "",
             "| d | T | " + " | ".join(variants) + " | 2:4 vs fp8 tensorwise | 2:4 vs bf16 | pack ms/step |",
             "|---" * (len(variants) + 5) + "|"]
    for d in dims:
        for T in tokens:
            ms = {v: get.get((d, T, v), {}).get("ms") for v in variants}
            sp = [ms[v] for v in SPARSE if ms.get(v)]
            best = min(sp) if sp else None
            r1 = f"{ms['fp8_tensorwise'] / best:.2f}x" if best and ms.get("fp8_tensorwise") else "-"
            r2 = f"{ms['bf16'] / best:.2f}x" if best and ms.get("bf16") else "-"
            pk = next((get[(d, T, v)]["pack_ms"] for v in SPARSE if (d, T, v) in get), None)
            lines.append(f"| {d} | {T} | " + " | ".join(fmt(ms[v]) for v in variants) + f" | {r1} | {r2} | {fmt(pk)} |")
    lines += ["", "Ratios use the faster of the two fp8 2:4 columns."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
