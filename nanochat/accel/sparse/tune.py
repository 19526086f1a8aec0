"""
Timing the 2:4 ops before training, for the choice in nanochat/accel/kernel_choice.py: cuSPARSELt against dense
bf16 for the bf16 kernels (time_gemm), fp8 2:4 against dense fp8 for the fp8 kernel (time_fp8_ops); the
choice itself is kernel_choice.choose, with sparse/convert.py's costs.

For a GEMM y = x @ A^T with A (m x k) 2:4 at T tokens, time dense (cuBLAS on the masked weight, the
layout the fallback uses) against every cuSPARSELt algorithm id, on random data (never zeros), with
CUDA events around a batch of calls queued behind a GPU sleep (so host launch cost does not count).
cuSPARSELt's own search sometimes picks a slower id, so we time them all. The timings go through the
run's TimingCache (kernel_choice.py), keyed by GPU, cuSPARSELt version, implementation, shape, token
count and op.

An op runs 2:4 iff its saving over the micro-batches of one optimizer step, with the "2:4" margin, pays
for packing its operand once per step (kernel_choice.pays).
"""

import torch

from nanochat.accel.hardware import FP8_TOKEN_ALIGN, round_up, time_gpu_ms
from nanochat.accel.kernel_choice import timing_key
from nanochat.accel.sparse.cusparselt import TOKEN_PAD
from nanochat.accel.sparse.fp8_ops import E4M3, E5M2, dense_operand, fp8_mm, quantize_tensor
from nanochat.accel.sparse.fp8_pack import LibraryFp8Packer
from nanochat.accel.sparse.mask import masked_bf16


def time_gemm(lib, m, k, T, op, device):
    """{alg, sparse_ms, dense_ms, num_algs} for y = x @ A^T, A (m x k) 2:4, x (T x k).
    op "fwd": the dense fallback is x @ W^T with W = A row-major; "dgrad": x @ W with W = A^T row-major."""
    g = torch.Generator(device=device).manual_seed(m * 131 + k)
    a = masked_bf16(torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g))
    x = torch.randn(T, k, device=device, dtype=torch.bfloat16, generator=g)
    if op == "fwd":
        dense_ms = time_gpu_ms(lambda: x @ a.t())
    else:
        at = a.t().contiguous()
        dense_ms = time_gpu_ms(lambda: x @ at)
    c = lib.compress(a, lib.empty_compressed(m, k))
    Tp = round_up(T, TOKEN_PAD)
    xp = torch.nn.functional.pad(x, (0, 0, 0, Tp - T)) if Tp != T else x
    n = lib.num_algs(m, k, Tp) or 64  # the torch implementation does not expose the count: probe
    best, best_ms, tried = None, float("inf"), 0
    for alg in range(n):
        try:
            ms = time_gpu_ms(lambda: lib.matmul(c, xp, m, alg))
        except (RuntimeError, ValueError):
            if tried:
                break  # past the last valid id
            raise
        tried += 1
        if ms < best_ms:
            best, best_ms = alg, ms
    return dict(alg=best, sparse_ms=best_ms, dense_ms=dense_ms, num_algs=tried)


def time_compress_ms(compressor, out, m, k, transposed, device):
    """GPU ms to compress one (m x k) 2:4 operand into out with this compressor, W or W^T memory order."""
    w = torch.randn(k, m, device=device, dtype=torch.bfloat16) if transposed else \
        torch.randn(m, k, device=device, dtype=torch.bfloat16)
    wm = masked_bf16(w)
    wm = wm.t() if transposed else wm
    return time_gpu_ms(lambda: compressor(wm, out), reps=3, batch=3)


def gemm_key(lib, m, k, T, op):
    """The TimingCache key of one GEMM's timings on this library object (see time_gemm)."""
    return timing_key("cusparselt", lib.device, f"cusparselt {lib.version}", lib.name, f"{m}x{k}", f"T{T}", op)


def time_fp8_ops(out_features, in_features, tokens, device, packers=None, cast=None):
    """{op: {sparse_ms, dense_ms, pack_ms, cast_ms}} for one weight shape at this token count, op in
    fwd (x Wm^T, x in e4m3) and dgrad (gy Wm, gy in e5m2): the fp8 2:4 CUTLASS GEMM and the dense cuBLAS
    fp8 GEMM on random data, and the once-per-step cost of preparing each one's weight operand (quantize +
    2:4 pack with packers[op], LibraryFp8Packer by default, against a tensorwise e4m3 cast), each written
    into kept buffers as the kernel's pack does. cast: the dense operand's cast (compiled by the runtime)."""
    packers = packers or {}
    cast_kw = {} if cast is None else {"cast": cast}
    T = round_up(tokens, FP8_TOKEN_ALIGN)
    g = torch.Generator(device=device).manual_seed(out_features * 131 + in_features)
    w = masked_bf16(torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16, generator=g))
    timings = {}
    for op, b, a_dtype in (("fwd", w, E4M3), ("dgrad", w.t(), E5M2)):
        aq, ascale = quantize_tensor(torch.randn(T, b.shape[1], device=device, dtype=torch.bfloat16, generator=g), a_dtype)
        packer = packers.get(op) or LibraryFp8Packer()
        packed = packer(b)
        dense = dense_operand(b, **cast_kw)
        timings[op] = dict(
            sparse_ms=time_gpu_ms(lambda: fp8_mm(aq, ascale, T, packed[0], packed[1], packed[2])),
            dense_ms=time_gpu_ms(lambda: fp8_mm(aq, ascale, T, dense[0], None, dense[2])),
            pack_ms=time_gpu_ms(lambda: packer(b, packed), reps=3, batch=3),
            cast_ms=time_gpu_ms(lambda: dense_operand(b, dense, **cast_kw), reps=3, batch=3))
    return timings
