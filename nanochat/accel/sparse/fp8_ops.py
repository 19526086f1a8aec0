"""
The fp8 pieces of the fp8 2:4 kernel (nanochat/accel/sparse/fp8_kernel.py): quantizing to e4m3/e5m2 with
tensorwise or row-wise scales, padding the token dim, the two GEMMs an op can run (torchao's sm90
CUTLASS fp8 2:4 GEMM on a packed operand, cuBLAS's dense fp8 GEMM on an e4m3 operand) and the dense
operand's once-per-step cast. torchao is imported only when a 2:4 GEMM runs.
"""

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2


def quantize_rows(t, dtype):
    """Row-wise fp8 quantization along the last dim: t ~ q * scale[..., None]. Scales in fp32."""
    fmax = torch.finfo(dtype).max
    t32 = t.float()
    amax = t32.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)  # all-zero rows (c_proj at init)
    scale = amax / fmax
    q = (t32 / scale).clamp(-fmax, fmax).to(dtype)
    return q, scale.squeeze(-1)


def quantize_tensor(t, dtype):
    """Tensorwise fp8 quantization: t ~ q * scale, one fp32 scale for the whole tensor."""
    fmax = torch.finfo(dtype).max
    t32 = t.float()
    scale = t32.abs().amax().clamp_min(1e-12) / fmax
    return (t32 / scale).clamp(-fmax, fmax).to(dtype), scale


def pad_rows(t, align):
    pad = (-t.shape[0]) % align
    return F.pad(t, (0, 0, 0, pad)) if pad else t


def scaled_grad_weight(gq, gs, xq, xs):
    """gy^T @ x from tensorwise fp8 operands (padded rows contribute zeros). _scaled_mm wants a
    row-major first and a column-major second operand: (M, T) @ (T, K)."""
    return torch._scaled_mm(gq.t().contiguous(), xq.t().contiguous().t(), scale_a=gs, scale_b=xs,
                            out_dtype=torch.bfloat16)


def fp8_mm(aq, ascale, n, packed, meta, scale):
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


def cast_tensorwise(w):
    """A dense op's operand: w in e4m3 with one scale, row-major whatever w's strides."""
    q, scale = quantize_tensor(w, E4M3)
    return q.contiguous(), scale


def quantize_rows_e4m3(w):
    q, scale = quantize_rows(w, E4M3)
    return q.contiguous(), scale


@torch.no_grad()
def dense_operand(w, out=None, cast=cast_tensorwise):
    """(q, None, scale) for a dense fp8 op, written into out's first and last tensors if given.
    cast: cast_tensorwise, or its compiled wrapper (SparseRuntime.compiled)."""
    q, scale = cast(w)
    if out is None:
        return q, None, scale
    out[0].copy_(q)
    out[2].copy_(scale)
    return out
