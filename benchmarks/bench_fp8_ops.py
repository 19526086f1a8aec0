"""
Benchmark (not a test): the ops of one fp8 2:4 MLP layer at the MLP shapes of the given depths: its GEMMs
(forward x Wm^T and grad-input gy Wm) through each fp8 kernel, and its once-per-step re-pack with torchao's
packer and with the learned one (nanochat/accel/sparse/fp8_pack.py).

    python -m benchmarks.bench_fp8_ops --depths 20 26 --tokens 32768

GEMMs, GPU ms per call (median of batches queued back to back), x in e4m3 (forward) or e5m2 (grad-input),
tensorwise scales as in training:
  cutlass     torchao's CUTLASS sm90 fp8 2:4 GEMM on the packed operand (what --fp8 --sparse runs)
  cublas      torch._scaled_mm on the dense e4m3 masked weight (the dense-op alternative)
  cusparselt  cuSPARSELt's E4M3 2:4 GEMM through torch._cslt_sparse_mm, fastest algorithm id: with the scales as
              a per-row alpha, or where that is rejected with no alpha (alpha 1, the scalar scale applied after);
              e5m2 operands are not offered by cuSPARSELt, so grad-input runs it with gy in e4m3
Each twice: "hot", the same operands every call (they stay in the 50 MB L2), and "cold", cycling through
4 copies of each operand, as in a training step where other work evicts them between calls.
Re-pack, GPU ms per call:
  mask       the transposable mask applied to the weight (masked_bf16, shared by every packer)
  pack_*     quantize + pack of W (forward operand) and of W^T (grad-input operand), each packer
  cast       the tensorwise e4m3 cast a dense fp8 op needs instead
  refresh    the whole layer re-pack as the trainer runs it (SemiSparseLinear.refresh: mask + both packs)
Writes fp8_ops_bench.json and .md under --out.
"""

import datetime
import itertools
import json
import os

import torch

from benchmarks import common_args as common
from nanochat.accel.hardware import time_gpu_ms
from nanochat.accel.sparse.fp8_kernel import Fp8SparseKernel
from nanochat.accel.sparse.fp8_ops import E4M3, E5M2, cast_tensorwise, dense_operand, fp8_mm, quantize_tensor
from nanochat.accel.sparse.fp8_pack import LibraryFp8Packer
from nanochat.accel.sparse.linear import SemiSparseLinear, SparseOp
from nanochat.accel.sparse.mask import masked_bf16
from nanochat.accel.sparse.runtime import SparseRuntime


def time_cycled(fn, args_list):
    """Median GPU ms per call of fn(*args), cycling through args_list."""
    args = itertools.cycle(args_list)
    return time_gpu_ms(lambda: fn(*next(args)))


def cusparselt_fp8(w_q, a_q, alpha):
    """(fn, compressed w_q, best alg, its ms) for cuSPARSELt E4M3: a_q (T x k) @ w_q^T * alpha[row] (alpha None:
    unscaled), w_q (m x k) e4m3 2:4 along rows; alg None if no algorithm runs."""
    c = torch._cslt_compress(w_q)
    def fn(c_, a_, alg):
        return torch._cslt_sparse_mm(c_, a_.t(), alpha=alpha, out_dtype=torch.bfloat16, transpose_result=True, alg_id=alg)
    best, best_ms = None, None
    for alg in range(64):
        try:
            ms = time_gpu_ms(lambda: fn(c, a_q, alg), reps=3, batch=3)
        except (RuntimeError, ValueError):
            if alg == 0:
                raise
            break
        if best_ms is None or ms < best_ms:
            best, best_ms = alg, ms
    return fn, c, best, best_ms


def bench_gemm(m, k, T, runtime, a_dtype, copies=4):
    """One row: a (T x k) @ Wop^T for a 2:4 weight operand Wop (m x k), activations in a_dtype, per kernel."""
    device = runtime.device
    g = torch.Generator(device=device).manual_seed(m * 7 + k)
    w = masked_bf16(torch.randn(m, k, device=device, generator=g) * k ** -0.5)
    packer = runtime.fp8_packer(m, k, "learned")
    wp = [packer(w) for _ in range(copies)]
    wd = [dense_operand(w) for _ in range(copies)]
    a16 = [torch.randn(T, k, device=device, dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    acts = [quantize_tensor(a, a_dtype) for a in a16]
    def cut(a, p):
        return fp8_mm(a[0], a[1], T, p[0], p[1], p[2])
    def dense(a, p):
        return fp8_mm(a[0], a[1], T, p[0], None, p[2])
    row = dict(m=m, k=k, T=T, activation="e4m3" if a_dtype == E4M3 else "e5m2",
               cutlass_hot=time_gpu_ms(lambda: cut(acts[0], wp[0])), cutlass_cold=time_cycled(cut, list(zip(acts, wp))),
               cublas_hot=time_gpu_ms(lambda: dense(acts[0], wd[0])), cublas_cold=time_cycled(dense, list(zip(acts, wd))))
    a8 = [quantize_tensor(a, E4M3) for a in a16]  # cuSPARSELt takes e4m3 activations only: always quantized so here
    ref = dense(a8[0], wd[0]).float()
    scale = wd[0][2] * a8[0][1]
    errors = []
    for alpha_kind in ("per-row", "none"):
        alpha = scale.expand(m).contiguous() if alpha_kind == "per-row" else None
        try:
            fn, c, alg, ms = cusparselt_fp8(wd[0][0], a8[0][0], alpha)
            cs = [c] + [torch._cslt_compress(p[0]) for p in wd[1:]]
            out = fn(c, a8[0][0], alg).float() * (1 if alpha is not None else scale)
            row.update(cusparselt_alpha=alpha_kind, cusparselt_alg=alg, cusparselt_hot=ms,
                       cusparselt_cold=time_cycled(lambda c_, a_: fn(c_, a_, alg), [(c_, a[0]) for c_, a in zip(cs, a8)]),
                       cusparselt_rel_err_vs_cublas=((out - ref).norm() / ref.norm()).item())
            break
        except Exception as e:  # not offered by this build: the row says so
            errors.append(f"{alpha_kind} alpha: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    if errors:
        row.update(cusparselt_error="; ".join(errors))
    return row


def bench_layer(m, k, runtime):
    """Rows for one (m x k) weight: one per packer."""
    device = runtime.device
    w = torch.randn(m, k, device=device) * k ** -0.5  # fp32 master weight, as the trainer keeps it
    wm = masked_bf16(w)
    mask_ms = time_gpu_ms(lambda: masked_bf16(w))
    cast = runtime.compiled(cast_tensorwise)
    dense = dense_operand(wm, cast=cast)
    cast_ms = time_gpu_ms(lambda: dense_operand(wm, dense, cast))
    rows = []
    for name, make in (("cutlass", lambda m_, k_: LibraryFp8Packer(runtime.compiled)),
                       ("learned", lambda m_, k_: runtime.fp8_packer(m_, k_, "learned"))):
        pw, pwt = make(m, k), make(k, m)
        bw, bwt = pw(wm), pwt(wm.t())
        layer = SemiSparseLinear(k, m, device=device)
        layer.weight.data.copy_(w)
        layer.kernel = Fp8SparseKernel(m, k, device, runtime)
        layer.kernel.configure(SparseOp(pw), SparseOp(pwt))
        layer.refresh(force=True)
        rows.append(dict(out_features=m, in_features=k, packer=name, mask_ms=mask_ms, cast_ms=cast_ms,
                         pack_w_ms=time_gpu_ms(lambda: pw(wm, bw)), pack_wt_ms=time_gpu_ms(lambda: pwt(wm.t(), bwt)),
                         refresh_ms=time_gpu_ms(lambda: layer.refresh(force=True))))
    return rows


def build_arg_parser():
    p = common.parser(__doc__.split("\n\n")[0])
    common.add_depths(p, [20, 26])
    p.add_argument("--tokens", type=int, default=32768, help="tokens per micro-batch (device batch 16 x 2048)")
    common.add_out(p, "out", "the output directory")
    return p


def main():
    args = build_arg_parser().parse_args()
    runtime = SparseRuntime("cuda")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cusparselt=torch.backends.cusparselt.version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m benchmarks.bench_fp8_ops --depths " + " ".join(map(str, args.depths)) + f" --tokens {args.tokens}")
    gemms, packs = [], []
    for depth in args.depths:
        d = depth * 64
        for layer, (m, k) in (("c_fc", (4 * d, d)), ("c_proj", (d, 4 * d))):
            # forward: x (e4m3) @ W^T; grad-input: gy (e5m2) @ W, whose 2:4 operand is W^T
            for op, (mo, ko), a_dtype in (("fwd", (m, k), E4M3), ("dgrad", (k, m), E5M2)):
                gemms.append(dict(depth=depth, layer=layer, op=op, **bench_gemm(mo, ko, args.tokens, runtime, a_dtype)))
                print({k_: round(v, 4) if isinstance(v, float) else v for k_, v in gemms[-1].items()}, flush=True)
            for row in bench_layer(m, k, runtime):
                packs.append(dict(depth=depth, layer=layer, **row))
                print({k_: round(v, 4) if isinstance(v, float) else v for k_, v in packs[-1].items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_ops_bench.json"), "w") as f:
        json.dump(dict(meta=meta, gemms=gemms, packs=packs), f, indent=1)

    def ms(v):
        return "-" if v is None else f"{v:.3f}"
    lines = [f"# fp8 2:4 layer ops ({meta['gpu']}, torch {meta['torch']}, cuSPARSELt {meta['cusparselt']}, {meta['date'][:10]})", "",
             f"`{meta['command']}`. GPU ms per call. hot: same operands every call; cold: 4 copies cycled.", "",
             "| depth | layer | op | weight operand | cutlass 2:4 hot / cold | cuBLAS dense fp8 hot / cold | cuSPARSELt E4M3 hot / cold (alg) |",
             "|---|---|---|---|---|---|---|"]
    for r in gemms:
        csl = (f"{ms(r['cusparselt_hot'])} / {ms(r['cusparselt_cold'])} (alg {r['cusparselt_alg']}, {r['cusparselt_alpha']} alpha, "
               f"error vs cuBLAS {r['cusparselt_rel_err_vs_cublas']:.1e})" if r.get("cusparselt_hot") is not None
               else r.get("cusparselt_error", "-"))
        lines.append(f"| {r['depth']} | {r['layer']} | {r['op']} ({r['activation']}) | {r['m']}x{r['k']} | "
                     f"{ms(r['cutlass_hot'])} / {ms(r['cutlass_cold'])} | {ms(r['cublas_hot'])} / {ms(r['cublas_cold'])} | {csl} |")
    lines += ["", "Re-pack of one layer, GPU ms per call; refresh = mask + quantize and pack of W and W^T, as in training.", "",
              "| depth | layer | weight | packer | mask | pack W | pack W^T | cast (dense op) | refresh |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in packs:
        lines.append(f"| {r['depth']} | {r['layer']} | {r['out_features']}x{r['in_features']} | {r['packer']} | "
                     f"{r['mask_ms']:.3f} | {r['pack_w_ms']:.3f} | {r['pack_wt_ms']:.3f} | {r['cast_ms']:.3f} | {r['refresh_ms']:.3f} |")
    with open(os.path.join(args.out, "fp8_ops_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

if __name__ == "__main__":
    main()
