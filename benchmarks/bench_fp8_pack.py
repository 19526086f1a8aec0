"""
Benchmark (not a test): the once-per-step re-pack of one fp8 2:4 MLP layer, with torchao's packer and with
the learned one (nanochat/sparse/fp8.py), at the MLP shapes of the given depths.

    python -m benchmarks.bench_fp8_pack --depths 20 26

Per depth and layer (c_fc: 4d x d, c_proj: d x 4d), GPU ms per call (median, calls queued back to back):
  mask       the transposable mask applied to the weight (masked_bf16, shared by every packer)
  pack_*     quantize + pack of W (forward operand) and of W^T (grad-input operand), each packer
  cast       the tensorwise e4m3 cast a dense fp8 op needs instead
  refresh_*  the whole layer re-pack as the trainer runs it (SemiSparseLinear.refresh: mask + both packs)
Writes fp8_pack_bench.json (one row per depth, layer and packer) and .md under --out.
"""

import argparse
import datetime
import json
import os

import torch

from nanochat.sparse.fp8 import Fp8SparseKernel, LearnedFp8Packer, LibraryFp8Packer, _dense_operand
from nanochat.sparse.linear import SemiSparseLinear
from nanochat.sparse.mask import masked_bf16
from nanochat.sparse.tune import time_gpu_ms


def bench_layer(m, k, device):
    """Rows for one (m x k) weight: one per packer."""
    w = torch.randn(m, k, device=device) * k ** -0.5  # fp32 master weight, as the trainer keeps it
    wm = masked_bf16(w)
    mask_ms = time_gpu_ms(lambda: masked_bf16(w))
    cast_ms = time_gpu_ms(lambda: _dense_operand(wm, _dense_operand(wm)))
    rows = []
    for name, make in (("cutlass", lambda m_, k_: LibraryFp8Packer()),
                       ("learned", lambda m_, k_: LearnedFp8Packer(m_, k_, device))):
        pw, pwt = make(m, k), make(k, m)
        bw, bwt = pw(wm), pwt(wm.t())
        layer = SemiSparseLinear(k, m, device=device)
        layer.weight.data.copy_(w)
        layer.kernel = Fp8SparseKernel(m, k, device)
        layer.kernel.configure(True, True, pw, pwt)
        layer.refresh(force=True)
        rows.append(dict(out_features=m, in_features=k, packer=name, mask_ms=mask_ms, cast_ms=cast_ms,
                         pack_w_ms=time_gpu_ms(lambda: pw(wm, bw)), pack_wt_ms=time_gpu_ms(lambda: pwt(wm.t(), bwt)),
                         refresh_ms=time_gpu_ms(lambda: layer.refresh(force=True))))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[20, 26])
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device("cuda")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python -m benchmarks.bench_fp8_pack --depths " + " ".join(map(str, args.depths)))
    rows = []
    for depth in args.depths:
        d = depth * 64
        for layer, (m, k) in (("c_fc", (4 * d, d)), ("c_proj", (d, 4 * d))):
            for row in bench_layer(m, k, device):
                rows.append(dict(depth=depth, layer=layer, **row))
                print({k_: round(v, 4) if isinstance(v, float) else v for k_, v in rows[-1].items()}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_pack_bench.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    lines = [f"# fp8 2:4 re-pack of one MLP layer ({meta['gpu']}, torch {meta['torch']}, {meta['date'][:10]})", "",
             f"`{meta['command']}`. GPU ms per call; refresh = mask + quantize and pack of W and W^T, as in training.", "",
             "| depth | layer | weight | packer | mask | pack W | pack W^T | cast (dense op) | refresh |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['layer']} | {r['out_features']}x{r['in_features']} | {r['packer']} | "
                     f"{r['mask_ms']:.3f} | {r['pack_w_ms']:.3f} | {r['pack_wt_ms']:.3f} | {r['cast_ms']:.3f} | {r['refresh_ms']:.3f} |")
    with open(os.path.join(args.out, "fp8_pack_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
