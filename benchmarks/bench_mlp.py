"""
Benchmark (not a test): one MLP (c_fc -> relu² -> c_proj) forward+backward in bf16, dense nn.Linear
vs SemiSparseLinear (cuSPARSELt with the timed per-shape fallback), both torch.compile'd; plus the
per-step prune+pack cost (refresh of both layers) and its share of a training step.

    python -m benchmarks.bench_mlp [--dims 768,1280,1664,2048] [--tokens 16384,32768,65536] [--out DIR]

Step-time model for the prune share: one optimizer step = 4 micro-batches of T tokens through the
full nanochat model of width d (depth d/64, vocab 32768) at 45% MFU of 989 TFLOP/s (the dense
d12-d20 runs in ../shared/notes measured 45-49%), refresh = depth x (refresh of c_fc + c_proj).
"""

import argparse
import datetime
import json
import os
import sys
import time

import torch

from nanochat.gpt import MLP as GPTMLP, GPTConfig
from nanochat import sparse
from nanochat.sparse import SemiSparseLinear


def MLP(d):
    """The model's own MLP block (c_fc -> relu² -> c_proj) at width d."""
    return GPTMLP(GPTConfig(n_embd=d))


def step_ms_model(d, T, micro=4, mfu=0.45, peak=989e12, vocab=32768):
    depth = d // 64
    n_matmul = 12 * depth * d * d + vocab * d  # attention 4d², MLP 8d² per layer, lm_head
    flops = (6 * n_matmul + 12 * depth * d * 2048) * T * micro
    return flops / (mfu * peak) * 1e3, depth


def bench_fwd_bwd(mlp, x, gy):
    params = [x] + list(mlp.parameters())
    def fn():
        mlp(x).backward(gy)
    for _ in range(3):  # compile, autotune, warm caches outside the timed region
        fn()
    torch.cuda.synchronize()
    from triton.testing import do_bench  # GPU-only dependency
    return do_bench(fn, warmup=50, rep=300, grad_to_none=params, return_mode="median")


def write_results(meta, rows, outs):
    """Markdown table + JSON, rewritten after every row so a cut-off run keeps what it measured."""
    head = ("| d | T | dense ms | 2:4 ms | speedup | kernels fwd/dgrad (S=cuSPARSELt, D=dense) | all-cuSPARSELt ms (x) "
            "| refresh ms (GPU / wall) | refresh % of step |")
    lines = [f"# MLP fwd+bwd, dense vs 2:4, both torch.compile'd, bf16",
             "", f"GPU {meta['gpu']}, torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, {meta['date']}",
             f"Command: `{meta['command']}`. Median of triton.testing.do_bench. Refresh = prune + pack of c_fc and c_proj.",
             "Step model: 4 micro-batches of T tokens, full model of width d (depth d/64), 45% MFU of 989 TFLOP/s.",
             "", head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['d']} | {r['T']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | {r['kernels']} "
                     f"| {r['forced_sparse_ms']:.3f} ({r['forced_speedup']:.2f}x) | {r['refresh_ms']:.3f} / {r['refresh_wall_ms']:.3f} "
                     f"| {100 * r['refresh_step_frac']:.2f}% / {100 * r['refresh_wall_step_frac']:.2f}% |")
    md = "\n".join(lines) + "\n"
    for out in outs:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "mlp_bench.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(out, "mlp_bench.md"), "w") as f:
            f.write(md)
    return md




def main():
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp needs a CUDA GPU (it times cuSPARSELt against dense GEMMs)")
    from triton.testing import do_bench
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="2048,1280,1664,768")
    ap.add_argument("--tokens", default="16384,32768,65536")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dims = [int(v) for v in args.dims.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    sparse._log = lambda msg: print("  " + msg, flush=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                cusparselt=torch.backends.cusparselt.version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m benchmarks.bench_mlp " + " ".join(sys.argv[1:]))
    print(meta, flush=True)
    rows = []
    for d in dims:
        torch.manual_seed(d)
        dense = MLP(d).to(dev, torch.bfloat16)
        with torch.no_grad():
            dense.c_proj.weight.normal_(0, 0.02)  # real training weights are never zero: neither here
        sp = MLP(d).to(dev, torch.bfloat16)
        sp.load_state_dict(dense.state_dict())
        sp.c_fc = SemiSparseLinear.from_linear(sp.c_fc, backend="cusparselt")
        sp.c_proj = SemiSparseLinear.from_linear(sp.c_proj, backend="cusparselt")
        sparse._SHAPE_LAYERS.update({(4 * d, d): ["mlp.c_fc"], (d, 4 * d): ["mlp.c_proj"]})
        layers = [sp.c_fc, sp.c_proj]
        refresh = lambda: [m.refresh(force=True) for m in layers]
        cdense, csp = torch.compile(dense, dynamic=True), torch.compile(sp, dynamic=True)  # one compile per d
        for T in tokens:
            x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
            sparse._SPARSE_OPS.clear()  # as in a training run at this T: its first forward decides the kernels
            refresh()
            t_dense = bench_fwd_bwd(cdense, x, gy)
            bench_fwd_bwd(csp, x, gy)  # autotune; then repack only what the plan uses, as each step does
            refresh()
            t_sparse = bench_fwd_bwd(csp, x, gy)
            # per-step prune+pack of both layers: GPU time (events) and host wall time (synchronized)
            refresh_ms = do_bench(refresh, warmup=20, rep=200, return_mode="median")
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(20):
                refresh()
            torch.cuda.synchronize(); refresh_wall_ms = (time.perf_counter() - t0) / 20 * 1e3
            sparse.FORCE = "sparse"  # the same with every op forced onto cuSPARSELt (no fallback)
            refresh()
            t_forced = bench_fwd_bwd(csp, x, gy)
            sparse.FORCE = None
            step_ms, depth = step_ms_model(d, T)
            plan = {name: sparse._PLANS.get((torch.cuda.current_device(), m.out_features, m.in_features, sparse._bucket(T)))
                    for name, m in (("c_fc", sp.c_fc), ("c_proj", sp.c_proj))}
            kern = " ".join(f"{n}:{'S' if p and p['fwd'] is not None else 'D'}{'S' if p and p['dgrad'] is not None else 'D'}"
                            for n, p in plan.items())
            row = dict(d=d, T=T, dense_ms=t_dense, sparse_ms=t_sparse, speedup=t_dense / t_sparse,
                       forced_sparse_ms=t_forced, forced_speedup=t_dense / t_forced, kernels=kern, plans=plan,
                       refresh_ms=refresh_ms, refresh_wall_ms=refresh_wall_ms, model_depth=depth,
                       model_step_ms=step_ms, refresh_step_frac=depth * refresh_ms / step_ms,
                       refresh_wall_step_frac=depth * refresh_wall_ms / step_ms)
            rows.append(row)
            md = write_results(meta, rows, [o for o in (args.out, os.environ.get("OUT")) if o])  # after every row
            print(f"d={d} T={T}: dense {t_dense:.3f} ms, 2:4 {t_sparse:.3f} ms ({row['speedup']:.2f}x, {kern}), "
                  f"forced cuSPARSELt {t_forced:.3f} ms ({row['forced_speedup']:.2f}x), refresh {refresh_ms:.3f} ms "
                  f"(wall {refresh_wall_ms:.3f}) = {100 * row['refresh_step_frac']:.2f}% of a modeled step", flush=True)
            del x, gy
        del dense, sp, cdense, csp
        torch.cuda.empty_cache()
    print(md)


if __name__ == "__main__":
    main()
