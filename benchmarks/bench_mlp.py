"""
Benchmark (not a test): one MLP (c_fc -> relu² -> c_proj) forward+backward in bf16, dense nn.Linear
vs SemiSparseLinear (cuSPARSELt with the timed per-shape fallback), both torch.compile'd; plus the
per-step prune+pack cost (refresh of both layers) and its share of a training step.

    python -m benchmarks.bench_mlp [--dims 768,1280,1664,2048] [--tokens 16384,32768,65536] [--out DIR]

Step-time model for the prune share: one optimizer step = 4 micro-batches of T tokens through the
full nanochat model of width d (depth d/64, vocab 32768) at 45% MFU of 989 TFLOP/s (the dense
d12-d20 runs in ../shared/notes measured 45-49%), refresh = depth x (refresh of c_fc + c_proj).
"""

import datetime
import json
import os
import shlex
import sys
import time

import torch

from benchmarks import common_args as common
from nanochat.accel.kernel_choice import default_timing_cache
from nanochat.accel.sparse import DENSE, SparseConfig, convert_mlp_to_sparse
from nanochat.accel.sparse.cusparselt import pick_impl
from nanochat.gpt import MLP as GPTMLP, GPTConfig


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
            "| refresh ms (GPU / wall) | refresh % of step | host us per 2:4 GEMM |")
    lines = ["# MLP fwd+bwd, dense vs 2:4, both torch.compile'd, bf16",
             "", f"GPU {meta['gpu']}, torch {meta['torch']}, cuSPARSELt {meta['cusparselt']} via {meta['impl']}, {meta['date']}",
             f"Command: `{meta['command']}`. Median of triton.testing.do_bench. Refresh = prune + pack of c_fc and c_proj.",
             "Step model: 4 micro-batches of T tokens, full model of width d (depth d/64), 45% MFU of 989 TFLOP/s.",
             "", head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['d']} | {r['T']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | {r['kernels']} "
                     f"| {r['forced_sparse_ms']:.3f} ({r['forced_speedup']:.2f}x) | {r['refresh_ms']:.3f} / {r['refresh_wall_ms']:.3f} "
                     f"| {100 * r['refresh_step_frac']:.2f}% / {100 * r['refresh_wall_step_frac']:.2f}% | {r['spmm_host_us']:.1f} |")
    md = "\n".join(lines) + "\n"
    for out in outs:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "mlp_bench.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(out, "mlp_bench.md"), "w") as f:
            f.write(md)
    return md




def convert(mlp, T, force=None):
    """The MLP's layers as SemiSparseLinear, kernels chosen for T tokens (an isolated layer: one
    micro-batch per step, so each op's saving must pay for one compression of its operand). The per-op choice
    only: backend cusparselt skips the trainer's whole-step gate (nanochat/accel/step_gate.py)."""
    holder = torch.nn.Module()
    holder.block = torch.nn.Module()
    holder.block.mlp = mlp  # names block.mlp.c_fc / c_proj: under `.mlp.` like the model's
    log = lambda msg: print("  " + msg, flush=True)
    config = SparseConfig(backend="cusparselt", tokens=T, micro_batches=1, force=force,
                          timing_cache=default_timing_cache(log), log=log)
    convert_mlp_to_sparse(holder, mlp.c_fc.weight.device, config)
    return holder


def op_algs(layer):
    """(fwd, dgrad) cuSPARSELt algorithm ids of a layer, DENSE for an op on the masked weight (where no op pays,
    the conversion leaves the masked kernel, which has no ids)."""
    return getattr(layer.kernel, "fwd_alg", DENSE), getattr(layer.kernel, "dgrad_alg", DENSE)


def spmm_host_us(layer, T, calls=50):
    """Host microseconds per cuSPARSELt call (queued behind a GPU sleep, so the GPU never waits)."""
    k = layer.kernel
    x = torch.randn(T, layer.in_features, device="cuda", dtype=torch.bfloat16)
    op = torch.ops.nanochat_sparse.spmm
    op(x, k.c, layer.out_features, k.fwd_alg, k.library_handle)
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    t0 = time.perf_counter()
    for _ in range(calls):
        op(x, k.c, layer.out_features, k.fwd_alg, k.library_handle)
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return host


def build_arg_parser():
    p = common.parser(__doc__)
    p.add_argument("--dims", default="2048,1280,1664,768")
    p.add_argument("--tokens", default="16384,32768,65536")
    common.add_out(p, "out", "the output directory")
    return p


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp needs a CUDA GPU (it times cuSPARSELt against dense GEMMs)")
    from triton.testing import do_bench
    args = build_arg_parser().parse_args()
    dims = [int(v) for v in args.dims.split(",")]
    tokens = [int(v) for v in args.tokens.split(",")]
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                cusparselt=torch.backends.cusparselt.version(), impl=pick_impl()[0],
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m benchmarks.bench_mlp " + shlex.join(sys.argv[1:]))
    print(meta, flush=True)
    rows = []
    for d in dims:
        torch.manual_seed(d)
        dense = MLP(d).to(dev, torch.bfloat16)
        with torch.no_grad():
            dense.c_proj.weight.normal_(0, 0.02)  # real training weights are never zero: neither here
        cdense = torch.compile(dense, dynamic=True)  # one compile per d
        for T in tokens:
            x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
            t_dense = bench_fwd_bwd(cdense, x, gy)
            result = {}
            for force in (None, "sparse"):
                torch._dynamo.reset()
                sp = MLP(d).to(dev, torch.bfloat16)
                sp.load_state_dict(dense.state_dict())
                holder = convert(sp, T, force)
                layers = [sp.c_fc, sp.c_proj]
                result[force] = (bench_fwd_bwd(torch.compile(sp, dynamic=False), x, gy), layers, holder)
            t_sparse, layers, holder = result[None]
            t_forced, forced_layers, _ = result["sparse"]
            refresh = lambda: [m.refresh(force=True) for m in forced_layers]
            # per-step prune+pack of both layers, every op sparse: GPU time (events) and host wall time
            refresh_ms = do_bench(refresh, warmup=20, rep=200, return_mode="median")
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(20):
                refresh()
            torch.cuda.synchronize(); refresh_wall_ms = (time.perf_counter() - t0) / 20 * 1e3
            host_us = spmm_host_us(forced_layers[0], T)
            step_ms, depth = step_ms_model(d, T)
            kern = " ".join(f"{n}:" + "".join("D" if alg == DENSE else "S" for alg in op_algs(m))
                            for n, m in zip(("c_fc", "c_proj"), layers))
            row = dict(d=d, T=T, dense_ms=t_dense, sparse_ms=t_sparse, speedup=t_dense / t_sparse,
                       forced_sparse_ms=t_forced, forced_speedup=t_dense / t_forced, kernels=kern,
                       algs={n: op_algs(m) for n, m in zip(("c_fc", "c_proj"), layers)},
                       compressor=forced_layers[0].kernel.compress_w.name, spmm_host_us=host_us,
                       refresh_ms=refresh_ms, refresh_wall_ms=refresh_wall_ms, model_depth=depth,
                       model_step_ms=step_ms, refresh_step_frac=depth * refresh_ms / step_ms,
                       refresh_wall_step_frac=depth * refresh_wall_ms / step_ms)
            rows.append(row)
            md = write_results(meta, rows, [o for o in (args.out, os.environ.get("OUT")) if o])  # after every row
            print(f"d={d} T={T}: dense {t_dense:.3f} ms, 2:4 {t_sparse:.3f} ms ({row['speedup']:.2f}x, {kern}), "
                  f"forced cuSPARSELt {t_forced:.3f} ms ({row['forced_speedup']:.2f}x), refresh {refresh_ms:.3f} ms "
                  f"(wall {refresh_wall_ms:.3f}, {row['compressor']}) = {100 * row['refresh_step_frac']:.2f}% of a modeled step, "
                  f"{host_us:.1f} us host per cuSPARSELt call", flush=True)
            del x, gy, result, layers, forced_layers, holder
        del dense, cdense
        torch.cuda.empty_cache()
    print(md)


if __name__ == "__main__":
    main()
