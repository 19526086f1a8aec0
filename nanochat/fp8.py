"""FP8 training on Hopper: dense Linear layers through torchao.float8, 2:4 sparse MLP layers
through torchao's sm90 CUTLASS fp8 sparse kernels (Fp8SparseKernel).

Nothing here imports torchao at module import time: CPU machines (and CI) never need it.

Dense recipe: tensorwise scaling (one scale per tensor, cuBLAS fp8 GEMMs). torchao documents it
as its fastest recipe and upstream nanochat measured it faster end to end than rowwise
(d26 on 8xH100: 740K tok/s tensorwise vs 564K rowwise, 630K bf16). benchmarks/bench_mlp_fp8.py
times both on our MLP shapes.

Sparse kernel: the 2:4 CUTLASS kernel takes row-wise scales only (one per token, one per weight
row), so the sparse path is row-wise by construction.
"""

import types
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import print0

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
TOKEN_ALIGN = 16  # token count is padded to this (fp8 GEMMs want inner dims % 16)


# -----------------------------------------------------------------------------
# Support checks

def _torchao_version():
    """torchao's version string, or None when it cannot be imported."""
    try:
        import torchao
    except Exception:
        return None
    return getattr(torchao, "__version__", "unknown")


def fp8_supported(device):
    """(ok, reason): fp8 training needs CUDA, compute capability >= 8.9 and torchao 0.17/0.18."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device is {device.type}, not cuda"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"GPU {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    version = _torchao_version()
    if version is None:
        return False, "torchao is not installed (pip install 'torchao>=0.17,<0.19')"
    if not version.startswith(("0.17", "0.18")):
        return False, f"torchao {version} is untested here (need 0.17 or 0.18)"
    return True, f"compute capability {major}.{minor}, torchao {version}"


def fp8_sparse_supported(device):
    """(ok, reason): the fp8 2:4 kernels are built for sm90 (Hopper) only."""
    ok, reason = fp8_supported(device)
    if not ok:
        return ok, reason
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major != 9:
        return False, f"torchao's fp8 2:4 CUTLASS kernels need sm90 (Hopper), GPU is sm{major}{minor}"
    return True, reason


# -----------------------------------------------------------------------------
# Dense fp8: torchao.float8

def _is_semi_sparse(mod):
    # By class name, so this module does not import nanochat.sparse (and subclasses count too).
    return any(cls.__name__ == "SemiSparseLinear" for cls in type(mod).__mro__)


def fp8_module_filter(mod, fqn, skipped=None):
    """Which Linear layers convert_to_float8 swaps. Dims that are not multiples of 16 are
    left in bf16 (fp8 GEMMs cannot take them) and their names appended to `skipped`."""
    if not isinstance(mod, nn.Linear):
        return False
    if fqn == "lm_head" or fqn.endswith(".lm_head"):
        return False  # logits stay in bf16/fp32: small share of FLOPs, sensitive to precision
    if _is_semi_sparse(mod):
        return False  # 2:4 layers have their own fp8 kernel (Fp8SparseKernel)
    if type(mod).__name__ == "Float8Linear":
        return False  # already converted
    if mod.in_features % 16 != 0 or mod.out_features % 16 != 0:
        if skipped is not None:
            skipped.append(f"{fqn} ({mod.out_features}x{mod.in_features})")
        return False
    return True


def convert_to_float8(model, device, log=print0, recipe="tensorwise"):
    """Swap the transformer's nn.Linear layers for torchao Float8Linear, in place.
    Call before torch.compile and DDP. Returns the names of the converted layers ([] when fp8
    is not supported here: then it logs one warning line and leaves the model in bf16)."""
    ok, reason = fp8_supported(device)
    if not ok:
        log(f"Warning: --fp8 requires a CUDA GPU with compute capability >= 8.9 and torchao 0.17/0.18 ({reason}), training in bf16")
        return []
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    converted, skipped = [], []

    def module_filter_fn(mod, fqn):
        keep = fp8_module_filter(mod, fqn, skipped)
        if keep:
            converted.append(fqn)
        return keep

    convert_to_float8_training(model, module_filter_fn=module_filter_fn, config=config)
    log(f"fp8: converted {len(converted)} Linear layers to float8 ({recipe} scaling)")
    if skipped:
        log(f"fp8: kept in bf16 (dims not multiples of 16): {', '.join(skipped)}")
    return converted


@contextmanager
def bf16_linears(model):
    """Inside this block torchao Float8Linear layers run as plain nn.Linear (bf16 under autocast).
    For eager sampling: a Float8 tensor rejects autocast's casts (aten.to.dtype) and fp8 GEMMs need
    token counts that are multiples of 16, while generation feeds one token at a time."""
    swapped = [m for m in model.modules() if type(m).__name__ == "Float8Linear"]
    for m in swapped:
        m.forward = types.MethodType(nn.Linear.forward, m)  # instance attribute shadows the class method
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward


# -----------------------------------------------------------------------------
# Sparse fp8: 2:4 weights through torchao's sm90 CUTLASS kernels

def _quantize_rows(t, dtype):
    """Row-wise fp8 quantization along the last dim: t ~ q * scale[..., None]. Scales in fp32."""
    fmax = torch.finfo(dtype).max
    t32 = t.float()
    amax = t32.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # all-zero rows (c_proj at init)
    scale = amax / fmax
    q = (t32 / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.squeeze(-1)


def _pad_rows(t, align):
    pad = (-t.shape[0]) % align
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def _sparse_mm(a, packed, meta, scale, qdtype):
    """a @ Wp^T where Wp is a packed 2:4 fp8 matrix; a is (N, K) any float dtype. Returns bf16."""
    n = a.shape[0]
    aq, ascale = _quantize_rows(_pad_rows(a, TOKEN_ALIGN), qdtype)
    out = torch.ops.torchao.rowwise_scaled_linear_sparse_cutlass_f8f8(
        aq, ascale, packed, meta, scale, None, torch.bfloat16)
    return out[:n]


def _fp8_grad_weight(gy, x):
    """gy^T @ x through torch._scaled_mm with tensorwise scales (as torchao's tensorwise recipe:
    e5m2 for the gradient, e4m3 for the activation). Token-dim (column) scales would need a
    reduction across tokens per feature and ran much slower in our first measurement."""
    gy, x = _pad_rows(gy, TOKEN_ALIGN), _pad_rows(x, TOKEN_ALIGN)
    gs = gy.abs().amax().float().clamp_min(1e-12) / torch.finfo(E5M2).max
    xs = x.abs().amax().float().clamp_min(1e-12) / torch.finfo(E4M3).max
    gq_t = (gy.float() / gs).clamp(-57344.0, 57344.0).to(E5M2).t().contiguous()  # (M, N) row-major
    xq_t = (x.float() / xs).clamp(-448.0, 448.0).to(E4M3).t().contiguous()  # (K, N); .t() below is column-major (N, K)
    return torch._scaled_mm(gq_t, xq_t.t(), scale_a=gs, scale_b=xs, out_dtype=torch.bfloat16)


class _Fp8SparseLinearFn(torch.autograd.Function):
    """y = x Wm^T, gx = gy Wm (both on packed 2:4 fp8 operands), gw = gy^T x dense.
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


class Fp8SparseKernel:
    """Kernel object for SemiSparseLinear: fp8 (e4m3, row-wise scales) 2:4 sparse products on sm90.

    pack(w_masked) once per optimizer step, outside torch.compile: quantizes W and W^T (the mask
    is transposable, so both are 2:4) and packs them into buffers allocated on the first pack and
    then overwritten in place, so compiled graphs see the same tensors every step (no recompile).
    linear(x, weight): differentiable y = x @ Wm^T; weight is the dense master weight, which
    receives the straight-through gradient.

    grad_dtype: fp8 format of grad-output in grad-input (the kernel takes e4m3 or e5m2; with
    row-wise scales e4m3's extra mantissa bit wins, range is covered by the per-token scale).
    fp8_grad_weight: grad-weight through torch._scaled_mm (tensorwise) instead of a bf16 GEMM."""

    def __init__(self, out_features, in_features, device, grad_dtype=E4M3, fp8_grad_weight=False):
        if not self.supports(out_features, in_features):
            raise ValueError(f"Fp8SparseKernel needs both dims divisible by 32, got {out_features}x{in_features}")
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
        new = self._pack_one(w) + self._pack_one(w.t().contiguous())
        names = ("w_packed", "w_meta", "w_scale", "wt_packed", "wt_meta", "wt_scale")
        for name, t in zip(names, new):
            buf = getattr(self, name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                setattr(self, name, t)  # first pack: these tensors are kept from now on
            else:
                buf.copy_(t)

    def linear(self, x, weight):
        assert self.w_packed is not None, "Fp8SparseKernel.linear called before pack()"
        return _Fp8SparseLinearFn.apply(
            x, weight, self.w_packed, self.w_meta, self.w_scale,
            self.wt_packed, self.wt_meta, self.wt_scale, self.grad_dtype, self.fp8_grad_weight)
