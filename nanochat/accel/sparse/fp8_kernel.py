"""
The fp8 2:4 kernel for --fp8 --sparse on Hopper: the forward and grad-input GEMMs through torchao's sm90
CUTLASS fp8 2:4 ops, grad-weight dense fp8. Same straight-through rule and once-per-step packing as the
bf16 kernels (nanochat/accel/sparse/linear.py), and the same interface (configure, pack, linear,
packed_buffers, describe).

Scaling is torchao's tensorwise recipe with 2:4 forward and grad-input: x is cast to e4m3 and gy to e5m2
once each, with one scale per tensor, and each cast feeds two GEMMs (x: forward and grad-weight; gy:
grad-input and grad-weight). The CUTLASS kernel's per-row scale is the tensor's scale broadcast; weight
operands carry one e4m3 scale per row (packed once per step).

Each of the two ops can instead run as a dense fp8 GEMM (cuBLAS, torch._scaled_mm) on the masked weight,
cast to e4m3 once per step: same pruned weights, no CUTLASS pack. The tuner picks per shape
(timed by sparse/tune.py's time_fp8_ops, chosen by kernel_choice.choose in sparse/convert.py).
"""

import torch
import torch.nn as nn

from nanochat.accel.hardware import FP8_TOKEN_ALIGN
from nanochat.accel.sparse.fp8_ops import (E4M3, E5M2, cast_tensorwise, dense_operand, fp8_mm, pad_rows, quantize_tensor,
                                           scaled_grad_weight)
from nanochat.accel.sparse.fp8_pack import LibraryFp8Packer
from nanochat.accel.sparse.linear import SparseOp


class _Fp8SparseTensorwiseFn(torch.autograd.Function):
    """x -> e4m3 and gy -> e5m2 once each, every GEMM in fp8. y = x Wm^T and gx = gy Wm (each on its
    2:4 packed or dense e4m3 operand); gw = gy^T x dense (straight-through)."""

    @staticmethod
    def forward(ctx, x, weight, w_packed, w_meta, w_scale, wt_packed, wt_meta, wt_scale):
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_tensor(pad_rows(x2, FP8_TOKEN_ALIGN), E4M3)
        y = fp8_mm(xq, xs, x2.shape[0], w_packed, w_meta, w_scale)
        ctx.save_for_backward(xq, xs, wt_packed, wt_meta, wt_scale)  # fp8: half the bytes of a bf16 x
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xq, xs, wt_packed, wt_meta, wt_scale = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gq, gs = quantize_tensor(pad_rows(gy2, FP8_TOKEN_ALIGN), E5M2)
        gx = fp8_mm(gq, gs, gy2.shape[0], wt_packed, wt_meta, wt_scale)
        gw = scaled_grad_weight(gq, gs, xq, xs)
        gx = gx.reshape(*gy.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return gx, gw.to(ctx.w_dtype), None, None, None, None, None, None


class Fp8SparseKernel(nn.Module):
    """Kernel module for SemiSparseLinear: fp8 2:4 products on sm90.

    pack(w_masked) once per optimizer step, outside torch.compile: quantizes W and W^T (the mask is
    transposable, so both are 2:4) and packs them into buffers allocated on the first pack and then
    overwritten in place, so compiled graphs see the same tensors every step (no recompile).
    linear(x, weight): differentiable y = x @ Wm^T; weight is the dense master weight, which receives
    the straight-through gradient. Both ops start 2:4 with torchao's packer; configure() changes that.
    runtime: the SparseRuntime whose compiled casts it uses (None: eager)."""

    name = "fp8"

    def __init__(self, out_features, in_features, device, runtime=None):
        if not self.supports(out_features, in_features):
            raise ValueError(f"Fp8SparseKernel needs both dims divisible by 32, got {out_features}x{in_features}")
        super().__init__()
        import torchao.ops  # noqa: F401  (registers torch.ops.torchao.* and their fake impls)
        self.out_features, self.in_features = out_features, in_features
        self.device = torch.device(device)
        self.compiler = runtime.compiled if runtime is not None else None
        self.cast = self.compiler(cast_tensorwise) if self.compiler else cast_tensorwise
        self.configure(SparseOp(LibraryFp8Packer(self.compiler)), SparseOp(LibraryFp8Packer(self.compiler)))

    @staticmethod
    def supports(out_features, in_features):
        # The sparse GEMM wants K % 32 for both products (K = in for forward, out for grad-input),
        # and the transposable mask tile kernel wants cols % 32.
        return out_features % 32 == 0 and in_features % 32 == 0

    def configure(self, fwd, dgrad):
        """Each op (fwd: x Wm^T, dgrad: gy Wm) 2:4 with the SparseOp's packer (an fp8 packer, its alg
        unused), or None: dense fp8 on the masked weight. The next pack allocates the buffers anew (a 2:4 operand
        and a dense one differ in shape), so configure before compiling."""
        self.fwd_sparse, self.dgrad_sparse = fwd is not None, dgrad is not None
        self.packers = {"w": fwd.pack if fwd else None, "wt": dgrad.pack if dgrad else None}
        self.w_packed = self.w_meta = self.w_scale = None
        self.wt_packed = self.wt_meta = self.wt_scale = None

    @torch.compiler.disable
    @torch.no_grad()
    def pack(self, w_masked):
        """w_masked: (out, in) weight with a transposable 2:4 mask already applied. The first pack allocates
        the buffers; later packs overwrite them in place."""
        assert w_masked.shape == (self.out_features, self.in_features), w_masked.shape
        w = w_masked.detach()
        for prefix, operand in (("w", w), ("wt", w.t())):
            names = (f"{prefix}_packed", f"{prefix}_meta", f"{prefix}_scale")
            out = tuple(getattr(self, n) for n in names)
            out = None if out[2] is None else out
            packer = self.packers[prefix]
            new = packer(operand, out) if packer else dense_operand(operand, out, self.cast)
            for name, t in zip(names, new):
                setattr(self, name, t)

    def packed_buffers(self):
        return [t for t in (self.w_packed, self.w_meta, self.w_scale, self.wt_packed, self.wt_meta, self.wt_scale)
                if t is not None]

    def describe(self):
        def op(sparse):
            return "2:4" if sparse else "dense fp8"
        return f"fwd {op(self.fwd_sparse)}, dgrad {op(self.dgrad_sparse)}"

    def linear(self, x, weight):
        assert self.w_packed is not None, "Fp8SparseKernel.linear called before pack()"
        return _Fp8SparseTensorwiseFn.apply(x, weight, self.w_packed, self.w_meta, self.w_scale,
                                            self.wt_packed, self.wt_meta, self.wt_scale)
