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

Packing: the weight operands are quantized and packed once per step by a packer per shape. LearnedFp8Packer
writes torchao's CUTLASS sm90 layout itself, quantization fused in (a third less GPU time than quantize + torchao's
packer; still well above memory speed); it learns that layout from torchao's packer and checks itself byte for byte against it, and a shape whose check fails keeps
LibraryFp8Packer (compiled quantization, then torchao's packer).

torchao is imported only when a kernel is built.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.sparse.compress import CompressorMismatch, dense_from_codes, learn_metadata, metadata_bytes, metadata_tables

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

    def configure(self, fwd_sparse, dgrad_sparse, pack_w=None, pack_wt=None):
        """Which ops run 2:4 (the rest dense fp8 on the masked weight), and the packers of W and W^T for
        the 2:4 ops (None: LibraryFp8Packer). Call before the first pack."""
        if self.scaling == "rowwise" and not (fwd_sparse and dgrad_sparse):
            raise ValueError("the rowwise fp8 2:4 kernel runs both ops 2:4; dense ops need scaling='tensorwise'")
        self.fwd_sparse, self.dgrad_sparse = bool(fwd_sparse), bool(dgrad_sparse)
        self.packers = {"w": pack_w or LibraryFp8Packer(), "wt": pack_wt or LibraryFp8Packer()}

    @torch.compiler.disable
    @torch.no_grad()
    def pack(self, w_masked):
        """w_masked: (out, in) weight with a transposable 2:4 mask already applied. The first pack allocates
        the buffers; later packs overwrite them in place."""
        assert w_masked.shape == (self.out_features, self.in_features), w_masked.shape
        w = w_masked.detach()
        for prefix, sparse, operand in (("w", self.fwd_sparse, w), ("wt", self.dgrad_sparse, w.t())):
            names = (f"{prefix}_packed", f"{prefix}_meta", f"{prefix}_scale")
            out = tuple(getattr(self, n) for n in names)
            out = None if out[2] is None else out
            new = self.packers[prefix](operand, out) if sparse else _dense_operand(operand, out)
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
        if self.scaling == "tensorwise":
            return _Fp8SparseTensorwiseFn.apply(x, weight, self.w_packed, self.w_meta, self.w_scale,
                                                self.wt_packed, self.wt_meta, self.wt_scale)
        return _Fp8SparseLinearFn.apply(
            x, weight, self.w_packed, self.w_meta, self.w_scale,
            self.wt_packed, self.wt_meta, self.wt_scale, self.grad_dtype, self.fp8_grad_weight)


# -----------------------------------------------------------------------------
# Quantizing and packing a weight operand once per step

_COMPILED = {}  # function -> its one torch.compile wrapper for the process


def _compiled(fn):
    """fn compiled with dynamic shapes, one wrapper per function: every wrapper of the same code counts
    against dynamo's recompile limit, so packers of all shapes share one."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _cast_tensorwise(w):
    """A dense op's operand: w in e4m3 with one scale, row-major whatever w's strides."""
    q, scale = _quantize_tensor(w, E4M3)
    return q.contiguous(), scale


def _quantize_rows_e4m3(w):
    q, scale = _quantize_rows(w, E4M3)
    return q.contiguous(), scale


@torch.no_grad()
def _dense_operand(w, out=None):
    """(q, None, scale) for a dense fp8 op, written into out's first and last tensors if given."""
    q, scale = _compiled(_cast_tensorwise)(w)
    if out is None:
        return q, None, scale
    out[0].copy_(q)
    out[2].copy_(scale)
    return out


def cutlass_pack(q):
    """torchao's CUTLASS sm90 packer: (values, metadata) of a row-major e4m3 2:4 matrix."""
    import torchao.ops  # noqa: F401  (registers torch.ops.torchao.*)
    return torch.ops.torchao.to_sparse_semi_structured_cutlass_sm9x_f8(q)


class LibraryFp8Packer:
    """Row-wise e4m3 quantization (compiled), then torchao's CUTLASS packer."""
    name = "cutlass"

    def __init__(self, compile=True):
        self.quantize = _compiled(_quantize_rows_e4m3) if compile else _quantize_rows_e4m3

    @torch.no_grad()
    def __call__(self, w, out=None):
        """(values, metadata, row scales) of w (m x k, 2:4 along rows, any strides); into out if given."""
        q, scale = self.quantize(w)
        new = (*cutlass_pack(q), scale)
        if out is None:
            return new
        for buf, t in zip(out, new):
            buf.copy_(t)
        return out


def _fp8_values_and_fields(qb, lut_a, lut_b):
    """The stored value bytes (2 per group, row-major) and per-group fields (a | b << 2, uint8) of an e4m3
    2:4 matrix given as its bytes. The kept entries are its non-zeros, -0 included among the zeros, and a
    zero stores as 0x00 (the CUTLASS compressor's rules)."""
    m, k = qb.shape
    q4 = qb.reshape(m, k // 4, 4)
    nz = (q4 & 0x7F) != 0
    code = nz[..., 0].long() | (nz[..., 1].long() << 1) | (nz[..., 2].long() << 2) | (nz[..., 3].long() << 3)
    a, b = lut_a[code], lut_b[code]
    kept = torch.where(nz, q4, torch.zeros_like(q4))
    values = torch.stack([kept.gather(-1, a.unsqueeze(-1)), kept.gather(-1, b.unsqueeze(-1))], dim=-1)
    return values.reshape(-1), (a | (b << 2)).to(torch.uint8).reshape(-1)


def _pack_learned(w, out_values, out_meta, out_scale, value_src, meta_layout, tables):
    """out_values, out_meta: flat uint8 views of the packed buffers."""
    q, scale = _quantize_rows(w, E4M3)
    out_scale.copy_(scale)
    values, fields = _fp8_values_and_fields(q.view(torch.uint8), tables[0], tables[1])
    if value_src is not None:  # the library's slot order, padding slots reading the appended zero
        values = torch.cat([values, values.new_zeros(1)])[value_src]
    out_values.copy_(values)
    out_meta.copy_(metadata_bytes(fields, meta_layout, tables))


class LearnedFp8Packer:
    """Quantizes and packs an (m x k) 2:4 weight operand into the CUTLASS sm90 fp8 layout itself, in one
    compiled function, into buffers it is handed. The value slots and metadata bit order are learned from
    the library's packer (lib: q -> (values, metadata)) on probe matrices, then checked byte for byte
    against it; CompressorMismatch if they do not reproduce it."""
    name = "learned"

    def __init__(self, m, k, device, lib=cutlass_pack, compile=True, check_rounds=2):
        self.m, self.k = m, k
        device = torch.device(device)
        G = m * k // 4
        values, meta = lib(torch.zeros(m, k, dtype=E4M3, device=device))
        self.value_shape, self.meta_shape = values.shape, meta.shape

        def meta_of(codes):
            return lib(dense_from_codes(codes, m, k).to(E4M3))[1].reshape(-1).clone()

        self.value_src = self._learn_value_slots(lib, m, k, device)
        self.meta_layout, self.tables = metadata_tables(*learn_metadata(meta_of, G, 8 * meta.numel(), device), G)
        self.layout = f"values {'row-major' if self.value_src is None else 'gathered'}, metadata {self.meta_layout}"
        self.fn = _compiled(_pack_learned) if compile else _pack_learned
        self._check(lib, device, check_rounds)

    def empty(self, device):
        return (torch.zeros(self.value_shape, dtype=E4M3, device=device),
                torch.zeros(self.meta_shape, dtype=torch.uint8, device=device),
                torch.zeros(self.m, dtype=torch.float32, device=device))

    @torch.no_grad()
    def __call__(self, w, out=None):
        """(values, metadata, row scales) of w (m x k bf16, 2:4 along rows, any strides), into out if given."""
        out = self.empty(w.device) if out is None else out
        values, meta, scale = out
        self.fn(w, values.view(torch.uint8).view(-1), meta.view(-1), scale, self.value_src, self.meta_layout, self.tables)
        return out

    @staticmethod
    def _learn_value_slots(lib, m, k, device):
        """For every value slot, the stored value (2 g for group g's first kept entry, 2 g + 1 its second, 2 G
        for padding), learned from probes whose groups all keep positions 0 and 1 with +-1 or +-2 by one bit
        of the group index. None when the slots are plain row-major."""
        G = m * k // 4
        group = torch.arange(G, device=device)
        one, two, sign = 0x38, 0x40, 0x80  # e4m3 bytes of 1.0 and 2.0, sign bit
        owner = None
        for j in range(max(1, (G - 1).bit_length())):
            mag = torch.where((group >> j) & 1 == 1, two, one).to(torch.uint8)
            dense = torch.zeros(G, 4, dtype=torch.uint8, device=device)
            dense[:, 0], dense[:, 1] = mag, mag | sign
            slots = lib(dense.view(E4M3).reshape(m, k))[0].view(torch.uint8).reshape(-1)
            if owner is None:
                owned, second = slots != 0, (slots & sign) != 0
                owner = torch.zeros(slots.numel(), dtype=torch.int64, device=device)
            owner |= ((slots & 0x7F) == two).long() << j
        src = torch.where(owned, 2 * owner + second.long(), 2 * G)
        if int(owned.sum()) != 2 * G or not torch.equal(torch.sort(src[owned]).values, torch.arange(2 * G, device=device)):
            raise CompressorMismatch("value slots do not map one-to-one onto the kept entries")
        if src.numel() == 2 * G and torch.equal(src, torch.arange(2 * G, device=device)):
            return None
        return src.to(torch.int32)

    def _check(self, lib, device, rounds):
        """Byte for byte against quantize + the library's packer, in W's and W^T's memory order: random
        e4m3 entries under random patterns (groups keeping fewer than two included, +-0 in the rest), each
        row's largest entry +-448 so that quantization is exact (row scale 1)."""
        g = torch.Generator(device=device).manual_seed(1234)
        m, k, G = self.m, self.k, self.m * self.k // 4
        patterns = torch.tensor([c for c in range(16) if bin(c).count("1") <= 2], device=device)
        for r in range(rounds):
            codes = patterns[torch.randint(0, len(patterns), (G,), device=device, generator=g)]
            if r == 0:  # full 2:4 only: six patterns
                codes = torch.tensor([3, 5, 6, 9, 10, 12], device=device)[codes % 6]
            codes.view(m, -1)[:, 0] = 3  # a row's first group keeps positions 0 and 1
            keep = ((codes.unsqueeze(-1) >> torch.arange(4, device=device)) & 1).bool()
            mag = torch.randint(1, 0x7E, (G, 4), device=device, generator=g)  # finite, non-zero, below 448
            byte = torch.where(keep, mag, 0) | (torch.randint(0, 2, (G, 4), device=device, generator=g) << 7)
            byte.view(m, -1, 4)[:, 0, 0] = 0x7E | (byte.view(m, -1, 4)[:, 0, 0] & 0x80)  # +-448
            q = byte.to(torch.uint8).view(E4M3).reshape(m, k)
            want = (*lib(q), torch.ones(m, device=device))
            for layout in ("contiguous", "transposed"):
                w = q.to(torch.bfloat16)
                w = w if layout == "contiguous" else w.t().contiguous().t()
                got = self(w)
                for name, a, b in zip(("values", "metadata", "scales"), got, want):
                    if not torch.equal(a.reshape(-1).view(torch.uint8) if a.dtype == E4M3 else a,
                                       b.reshape(-1).view(torch.uint8) if b.dtype == E4M3 else b):
                        raise CompressorMismatch(f"{name} differ from the library's ({layout} input, round {r})")


_PACKERS = {}  # (m, k, kind) -> packer: learning a layout is done once per process


def make_fp8_packer(m, k, device, kind="auto", log=None):
    """LearnedFp8Packer where it reproduces torchao's bytes ("auto" or "learned"), else LibraryFp8Packer
    ("auto" after logging why, or "cutlass"). One per shape for the process."""
    key = (m, k, kind)
    if key not in _PACKERS:
        if kind not in ("auto", "learned", "cutlass"):
            raise ValueError(f"unknown fp8 packer {kind!r}: use auto, learned or cutlass")
        packer = None
        if kind != "cutlass":
            try:
                packer = LearnedFp8Packer(m, k, device)
            except Exception as e:  # a layout it cannot reproduce (CompressorMismatch), or a compile failure
                if kind == "learned":
                    raise
                if log:
                    log(f"fp8 2:4 packer for {m}x{k}: the learned layout does not match torchao's ({e}); using torchao's packer")
        _PACKERS[key] = packer or LibraryFp8Packer()
    return _PACKERS[key]


# -----------------------------------------------------------------------------
# Choosing 2:4 or dense fp8 per op, from measured GPU time

def time_ops(out_features, in_features, tokens, device, packers=None):
    """{op: {sparse_ms, dense_ms, pack_ms, cast_ms}} for one weight shape at this token count, op in
    fwd (x Wm^T, x in e4m3) and dgrad (gy Wm, gy in e5m2): the fp8 2:4 CUTLASS GEMM and the dense cuBLAS
    fp8 GEMM on random data, and the once-per-step cost of preparing each one's weight operand (quantize +
    2:4 pack with packers[op], LibraryFp8Packer by default, against a tensorwise e4m3 cast), each written
    into kept buffers as the kernel's pack does."""
    from nanochat.sparse.mask import masked_bf16
    from nanochat.sparse.tune import time_gpu_ms
    packers = packers or {}
    T = -(-tokens // TOKEN_ALIGN) * TOKEN_ALIGN
    g = torch.Generator(device=device).manual_seed(out_features * 131 + in_features)
    w = masked_bf16(torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16, generator=g))
    timings = {}
    for op, b, a_dtype in (("fwd", w, E4M3), ("dgrad", w.t(), E5M2)):
        aq, ascale = _quantize_tensor(torch.randn(T, b.shape[1], device=device, dtype=torch.bfloat16, generator=g), a_dtype)
        packer = packers.get(op) or LibraryFp8Packer()
        packed = packer(b)
        dense = _dense_operand(b)
        timings[op] = dict(
            sparse_ms=time_gpu_ms(lambda: _mm_q(aq, ascale, T, packed[0], packed[1], packed[2])),
            dense_ms=time_gpu_ms(lambda: _mm_q(aq, ascale, T, dense[0], None, dense[2])),
            pack_ms=time_gpu_ms(lambda: packer(b, packed), reps=3, batch=3),
            cast_ms=time_gpu_ms(lambda: _dense_operand(b, dense), reps=3, batch=3))
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
