"""
fp8 2:4 sparse kernel for --fp8 --sparse on Hopper: the forward and grad-input GEMMs through torchao's
sm90 CUTLASS fp8 sparse ops, grad-weight dense. Same straight-through rule and once-per-step packing as
the bf16 kernels (nanochat/sparse/linear.py).

Each of the two 2:4 ops (forward, grad-input) can instead run as a dense fp8 GEMM (cuBLAS, torch._scaled_mm)
on the masked weight, cast to e4m3 once per step: same pruned weights, no CUTLASS pack. choose_ops() picks
per shape from measured GPU time, as nanochat/sparse/tune.py does for the bf16 kernels.

Weights are packed with row-wise e4m3 scales (one per output row, once per step). Activations and
grad-outputs are scaled one of two ways:
- tensorwise (default), torchao's dense fp8 recipe with 2:4 forward and grad-input: x is cast to e4m3
  and gy to e5m2 once each, with one scale per tensor, and each cast feeds two GEMMs (x: forward and
  grad-weight; gy: grad-input and grad-weight). The CUTLASS kernel's per-row scale is the tensor's
  scale broadcast. grad-weight runs in fp8 (torch._scaled_mm), like --fp8's dense layers.
- rowwise: one scale per token for the 2:4 GEMMs (more precise on outlier tokens), grad-weight in
  bf16 (or fp8 tensorwise with fp8_grad_weight). Each operand is cast separately for each GEMM.

torchao is imported only when a kernel is built.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
TOKEN_ALIGN = 16  # token count is padded to this (fp8 GEMMs want inner dims % 16)


def _quantize_rows(t, dtype):
    """Row-wise fp8 quantization along the last dim: t ~ q * scale[..., None]. Scales in fp32."""
    fmax = torch.finfo(dtype).max
    t32 = t.float()
    amax = t32.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # all-zero rows (c_proj at init)
    scale = amax / fmax
    q = (t32 / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.squeeze(-1)


def _quantize_tensor(t, dtype):
    """Tensorwise fp8 quantization: t ~ q * scale, one fp32 scale for the whole tensor."""
    fmax = torch.finfo(dtype).max
    t32 = t.float()
    scale = t32.abs().amax().clamp_min(1e-12) / fmax
    return (t32 / scale).clamp(-fmax, fmax).to(dtype), scale


def _pad_rows(t, align):
    pad = (-t.shape[0]) % align
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _scaled_grad_weight(gq, gs, xq, xs):
    """gy^T @ x from tensorwise fp8 operands (padded rows contribute zeros). _scaled_mm wants a
    row-major first and a column-major second operand: (M, T) @ (T, K)."""
    return torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=gs, scale_b=xs,
                            out_dtype=torch.bfloat16)


def _fp8_grad_weight(gy, x):
    """gy^T @ x in fp8 with tensorwise scales (as torchao's tensorwise recipe: e5m2 for the gradient,
    e4m3 for the activation). Token-dim (column) scales would need a reduction across tokens per
    feature and ran much slower in our first measurement."""
    gq, gs = _quantize_tensor(_pad_rows(gy, TOKEN_ALIGN), E5M2)
    xq, xs = _quantize_tensor(_pad_rows(x, TOKEN_ALIGN), E4M3)
    return _scaled_grad_weight(gq, gs, xq, xs)


def _mm_q(aq, ascale, n, packed, meta, scale):
    """aq @ B^T for an already quantized (padded) aq; first n rows, bf16. ascale: one scale, or one per
    row of aq (2:4 only). B is the op's weight operand, (out, reduction): 2:4 packed with its metadata and
    per-row scales, or (meta None) a row-major e4m3 matrix with one scale, multiplied densely by cuBLAS."""
    if meta is None:
        out = torch._scaled_mm(aq, packed.t(), scale_a=ascale, scale_b=scale, out_dtype=torch.bfloat16)
    else:
        rows = ascale.expand(aq.shape[0]).contiguous()
        out = torch.ops.torchao.rowwise_scaled_linear_sparse_cutlass_f8f8(
            aq, rows, packed, meta, scale, None, torch.bfloat16)
    return out[:n]


def _sparse_mm(a, packed, meta, scale, qdtype):
    """a @ Wp^T where Wp is a packed 2:4 fp8 matrix; a is (N, K) any float dtype, quantized per row. Returns bf16."""
    aq, ascale = _quantize_rows(_pad_rows(a, TOKEN_ALIGN), qdtype)
    return _mm_q(aq, ascale, a.shape[0], packed, meta, scale)


class _Fp8SparseTensorwiseFn(torch.autograd.Function):
    """Tensorwise scaling: x -> e4m3 and gy -> e5m2 once each, every GEMM in fp8.
    y = x Wm^T and gx = gy Wm (each on its 2:4 packed or dense e4m3 operand); gw = gy^T x dense
    (straight-through)."""

    @staticmethod
    def forward(ctx, x, weight, w_packed, w_meta, w_scale, wt_packed, wt_meta, wt_scale):
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = _quantize_tensor(_pad_rows(x2, TOKEN_ALIGN), E4M3)
        y = _mm_q(xq, xs, x2.shape[0], w_packed, w_meta, w_scale)
        ctx.save_for_backward(xq, xs, wt_packed, wt_meta, wt_scale)  # fp8: half the bytes of a bf16 x
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        xq, xs, wt_packed, wt_meta, wt_scale = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gq, gs = _quantize_tensor(_pad_rows(gy2, TOKEN_ALIGN), E5M2)
        gx = _mm_q(gq, gs, gy2.shape[0], wt_packed, wt_meta, wt_scale)
        gw = _scaled_grad_weight(gq, gs, xq, xs)
        gx = gx.reshape(*gy.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return gx, gw.to(ctx.w_dtype), None, None, None, None, None, None


class _Fp8SparseLinearFn(torch.autograd.Function):
    """Rowwise scaling: y = x Wm^T, gx = gy Wm (both on packed 2:4 fp8 operands), gw = gy^T x dense.
    Straight-through: gw goes to the dense master weight, unmasked."""

    @staticmethod
    def forward(ctx, x, weight, w_packed, w_meta, w_scale, wt_packed, wt_meta, wt_scale,
                grad_dtype, fp8_grad_weight):
        x2 = x.reshape(-1, x.shape[-1])
        y = _sparse_mm(x2, w_packed, w_meta, w_scale, E4M3)
        ctx.save_for_backward(x2.to(torch.bfloat16), wt_packed, wt_meta, wt_scale)
        # Only constants on ctx: shapes (SymInts under dynamic shapes) broke dynamo's tracing.
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.grad_dtype, ctx.fp8_grad_weight = grad_dtype, fp8_grad_weight
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, gy):
        x2, wt_packed, wt_meta, wt_scale = ctx.saved_tensors
        gy2 = gy.reshape(-1, gy.shape[-1])
        gx = _sparse_mm(gy2, wt_packed, wt_meta, wt_scale, ctx.grad_dtype)
        if ctx.fp8_grad_weight:
            gw = _fp8_grad_weight(gy2, x2)
        else:
            gw = gy2.to(torch.bfloat16).t() @ x2
        gx = gx.reshape(*gy.shape[:-1], gx.shape[-1]).to(ctx.x_dtype)
        return gx, gw.to(ctx.w_dtype), None, None, None, None, None, None, None, None


class Fp8SparseKernel(nn.Module):
    """Kernel module for SemiSparseLinear: fp8 2:4 sparse products on sm90.

    pack(w_masked) once per optimizer step, outside torch.compile: quantizes W and W^T (the mask
    is transposable, so both are 2:4) and packs them into buffers allocated on the first pack and
    then overwritten in place, so compiled graphs see the same tensors every step (no recompile).
    linear(x, weight): differentiable y = x @ Wm^T; weight is the dense master weight, which
    receives the straight-through gradient.

    scaling: "tensorwise" or "rowwise" activations and grad-outputs (module docstring).
    fwd_sparse, dgrad_sparse (tensorwise only; configure() sets them): each op on the 2:4 packed weight,
    or dense fp8 on the masked weight cast to e4m3 once per step.
    rowwise only: grad_dtype, the fp8 format of grad-output in grad-input (the kernel takes e4m3 or
    e5m2; with row-wise scales e4m3's extra mantissa bit wins, range is covered by the per-token scale);
    fp8_grad_weight, grad-weight through torch._scaled_mm (tensorwise) instead of a bf16 GEMM."""

    name = "fp8"

    def __init__(self, out_features, in_features, device, scaling="tensorwise", grad_dtype=E4M3, fp8_grad_weight=False,
                 fwd_sparse=True, dgrad_sparse=True):
        if not self.supports(out_features, in_features):
            raise ValueError(f"Fp8SparseKernel needs both dims divisible by 32, got {out_features}x{in_features}")
        if scaling not in ("tensorwise", "rowwise"):
            raise ValueError(f"scaling must be 'tensorwise' or 'rowwise', got {scaling!r}")
        super().__init__()
        self.scaling = scaling
        self.configure(fwd_sparse, dgrad_sparse)
        import torchao.ops  # noqa: F401  (registers torch.ops.torchao.* and their fake impls)
        self.out_features, self.in_features = out_features, in_features
        self.device = torch.device(device)
        self.grad_dtype, self.fp8_grad_weight = grad_dtype, fp8_grad_weight
        self.w_packed = self.w_meta = self.w_scale = None
        self.wt_packed = self.wt_meta = self.wt_scale = None

    @staticmethod
    def supports(out_features, in_features):
        # The sparse GEMM wants K % 32 for both products (K = in for forward, out for grad-input),
        # and the transposable mask tile kernel wants cols % 32.
        return out_features % 32 == 0 and in_features % 32 == 0

    def configure(self, fwd_sparse, dgrad_sparse):
        """Which ops run 2:4 (the rest dense fp8 on the masked weight). Call before the first pack."""
        if self.scaling == "rowwise" and not (fwd_sparse and dgrad_sparse):
            raise ValueError("the rowwise fp8 2:4 kernel runs both ops 2:4; dense ops need scaling='tensorwise'")
        self.fwd_sparse, self.dgrad_sparse = bool(fwd_sparse), bool(dgrad_sparse)

    @staticmethod
    def _pack_one(w):
        q, scale = _quantize_rows(w, E4M3)
        packed, meta = torch.ops.torchao.to_sparse_semi_structured_cutlass_sm9x_f8(q)
        return packed, meta, scale

    @torch.compiler.disable
    @torch.no_grad()
    def pack(self, w_masked):
        """w_masked: (out, in) weight with a transposable 2:4 mask already applied."""
        assert w_masked.shape == (self.out_features, self.in_features), w_masked.shape
        w = w_masked.detach()
        dense = None if (self.fwd_sparse and self.dgrad_sparse) else _quantize_tensor(w, E4M3)
        new = self._pack_one(w) if self.fwd_sparse else (dense[0], None, dense[1])
        new += self._pack_one(w.t().contiguous()) if self.dgrad_sparse else (dense[0].t().contiguous(), None, dense[1])
        names = ("w_packed", "w_meta", "w_scale", "wt_packed", "wt_meta", "wt_scale")
        for name, t in zip(names, new):
            buf = getattr(self, name)
            if t is None or buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                setattr(self, name, t)  # first pack: these tensors are kept from now on
            else:
                buf.copy_(t)

    def packed_buffers(self):
        return [t for t in (self.w_packed, self.w_meta, self.w_scale, self.wt_packed, self.wt_meta, self.wt_scale)
                if t is not None]

    def describe(self):
        def op(sparse):
            return "2:4" if sparse else "dense fp8"
        return f"fwd {op(self.fwd_sparse)}, dgrad {op(self.dgrad_sparse)}"

    def linear(self, x, weight):
        assert self.w_packed is not None, "Fp8SparseKernel.linear called before pack()"
        if self.scaling == "tensorwise":
            return _Fp8SparseTensorwiseFn.apply(x, weight, self.w_packed, self.w_meta, self.w_scale,
                                                self.wt_packed, self.wt_meta, self.wt_scale)
        return _Fp8SparseLinearFn.apply(
            x, weight, self.w_packed, self.w_meta, self.w_scale,
            self.wt_packed, self.wt_meta, self.wt_scale, self.grad_dtype, self.fp8_grad_weight)


# -----------------------------------------------------------------------------
# Choosing 2:4 or dense fp8 per op, from measured GPU time

def time_ops(out_features, in_features, tokens, device):
    """{op: {sparse_ms, dense_ms, pack_ms, cast_ms}} for one weight shape at this token count, op in
    fwd (x Wm^T, x in e4m3) and dgrad (gy Wm, gy in e5m2): the fp8 2:4 CUTLASS GEMM and the dense cuBLAS
    fp8 GEMM on random data, and the once-per-step cost of preparing each one's weight operand
    (quantize + 2:4 pack, against a tensorwise e4m3 cast)."""
    from nanochat.sparse.mask import masked_bf16
    from nanochat.sparse.tune import time_gpu_ms
    T = -(-tokens // TOKEN_ALIGN) * TOKEN_ALIGN
    g = torch.Generator(device=device).manual_seed(out_features * 131 + in_features)
    w = masked_bf16(torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16, generator=g))
    timings = {}
    for op, b, a_dtype in (("fwd", w, E4M3), ("dgrad", w.t().contiguous(), E5M2)):
        aq, ascale = _quantize_tensor(torch.randn(T, b.shape[1], device=device, dtype=torch.bfloat16, generator=g), a_dtype)
        packed, meta, scale = Fp8SparseKernel._pack_one(b)
        bq, bscale = _quantize_tensor(b, E4M3)
        timings[op] = dict(
            sparse_ms=time_gpu_ms(lambda: _mm_q(aq, ascale, T, packed, meta, scale)),
            dense_ms=time_gpu_ms(lambda: _mm_q(aq, ascale, T, bq, None, bscale)),
            pack_ms=time_gpu_ms(lambda: Fp8SparseKernel._pack_one(b), reps=3, batch=3),
            cast_ms=time_gpu_ms(lambda: _quantize_tensor(b, E4M3), reps=3, batch=3))
    return timings


def choose_ops(timings, micro_batches, slowdown=None):
    """{op: True for 2:4}: an op runs 2:4 iff its GEMM saving over the step's micro-batches pays for
    packing its operand instead of casting it. slowdown: how much slower, relative to the dense GEMM, a
    2:4 GEMM runs inside a training step than timed alone; by default the bf16 kernels' margin
    (nanochat/sparse/tune.py). A larger margin fitted to the profiler's per-kernel times sent every op
    dense at d20 with 4 micro-batches, and that step ran 4% slower (docs/fp8-notes.md)."""
    if slowdown is None:
        from nanochat.sparse.tune import IN_MODEL_SLOWDOWN as slowdown
    return {op: (t["dense_ms"] - slowdown * t["sparse_ms"]) * micro_batches > t["pack_ms"] - t["cast_ms"]
            for op, t in timings.items()}
