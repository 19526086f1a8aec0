"""CPU tests of LearnedFp8Packer (nanochat/accel/sparse/fp8_pack.py) against stand-ins for torchao's CUTLASS sm90 fp8
packer whose value slots and metadata bits are scrambled: the packer must learn both from probes alone,
reproduce the stand-in's bytes after its own row-wise quantization, and refuse a layout it cannot
reproduce. The real packer is checked on the GPU (tests/test_fp8_gpu.py). Also: Fp8SparseKernel's buffers after
its ops change (torchao's module faked)."""

import pytest
import torch

from nanochat.accel.sparse.compress import CompressorMismatch
from nanochat.accel.sparse.fp8_ops import E4M3, quantize_rows
from nanochat.accel.sparse.fp8_pack import LearnedFp8Packer, LibraryFp8Packer
from nanochat.accel.sparse.runtime import SparseRuntime
from nanochat.accel.sparse.mask import transposable_mask_reference


class ScrambledCutlass:
    """A stand-in for to_sparse_semi_structured_cutlass_sm9x_f8 with the CUTLASS compressor's rules: the
    non-zeros of each group of 4 (-0 counts as zero) in order; one non-zero at position 3 stores (0, 3)
    with a zero first, one elsewhere (i, 3) with a zero second, none (0, 0). The values land in shuffled
    slots among zero padding, and the 4 metadata bits of every group at shuffled positions (or shuffled
    whole nibbles) among constant padding bits."""

    def __init__(self, m, k, seed=0, nibbles=False, broken=False):
        g = torch.Generator().manual_seed(seed)
        G = m * k // 4
        self.m, self.k = m, k
        self.value_slots = torch.randperm(2 * G + 2 * m, generator=g)[:2 * G]  # 2 padding columns
        self.nbits = 4 * G if nibbles else 4 * G + 64
        if nibbles:
            self.perm = (4 * torch.randperm(G, generator=g)).unsqueeze(-1).add(torch.arange(4)).reshape(-1)
        else:
            self.perm = torch.randperm(self.nbits, generator=g)[:4 * G]
        self.const = torch.zeros(self.nbits, dtype=torch.bool) if nibbles else torch.randint(0, 2, (self.nbits,), generator=g).bool()
        self.broken = broken  # values of the second kept entry land in the first's slot of the next group

    def __call__(self, q):
        m, k = q.shape
        assert (m, k) == (self.m, self.k) and q.dtype == E4M3 and q.is_contiguous()
        qb = q.view(torch.uint8).reshape(m, k // 4, 4)
        nz = (qb & 0x7F) != 0
        assert nz.sum(-1).max() <= 2
        score = nz.long() * 8 + torch.arange(4)  # non-zeros first, by position
        idx = score.topk(2, dim=-1).indices.sort(dim=-1).values
        one = nz.sum(-1) == 1
        only = score.argmax(-1)
        idx[..., 0] = torch.where(one, torch.where(only == 3, 0, only), idx[..., 0])
        idx[..., 1] = torch.where(one, 3, idx[..., 1])
        idx = torch.where((nz.sum(-1) == 0).unsqueeze(-1), 0, idx)
        kept = torch.where(nz, qb, 0).gather(-1, idx).reshape(-1)
        values = torch.zeros(2 * m * k // 4 + 2 * m, dtype=torch.uint8)
        slots = self.value_slots.clone()
        if self.broken:
            slots[1::2] = slots[0::2].roll(-1)
        values[slots] = kept
        a, b = idx[..., 0].reshape(-1), idx[..., 1].reshape(-1)
        fields = torch.stack([a & 1, a >> 1, b & 1, b >> 1], dim=-1).reshape(-1).bool()
        bits = self.const.clone()
        bits[self.perm] = fields
        meta = (bits.view(-1, 8).to(torch.int32) << torch.arange(8)).sum(-1).to(torch.uint8)
        return values.view(E4M3).reshape(m, -1), meta.reshape(-1, 4)


def masked_weight(m, k, seed):
    w = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * k ** -0.5
    w = torch.where(transposable_mask_reference(w), w, 0).to(torch.bfloat16)
    w[0, :8] = 0  # whole groups of zeros (c_proj starts at zero), and -0 entries
    w[1, 4:8] = -0.0
    return w


@pytest.mark.parametrize("m,k,nibbles", [(32, 64, False), (64, 32, True), (16, 128, True)])
def test_learned_fp8_packer_reproduces_quantize_and_library(m, k, nibbles):
    lib = ScrambledCutlass(m, k, seed=m + k, nibbles=nibbles)
    packer = LearnedFp8Packer(m, k, "cpu", lib=lib)  # its own byte check runs in __init__
    assert packer.layout == f"values gathered, metadata {'nibbles' if nibbles else 'bits'}"
    for seed in range(3):
        w = masked_weight(m, k, seed)
        q, scale = quantize_rows(w, E4M3)
        want_values, want_meta = lib(q)
        for wm in (w, w.t().contiguous().t()):  # W's memory order, and W^T's (the grad-input operand)
            values, meta, got_scale = packer(wm)
            assert torch.equal(values.view(torch.uint8), want_values.view(torch.uint8))
            assert torch.equal(meta, want_meta) and torch.equal(got_scale, scale)
        out = packer.empty("cpu")
        assert packer(w, out) is out and torch.equal(out[1], want_meta)  # in place, into kept buffers


def test_learned_fp8_packer_refuses_a_layout_it_cannot_reproduce():
    lib = ScrambledCutlass(32, 64, broken=True)
    with pytest.raises(CompressorMismatch, match="value slots"):
        LearnedFp8Packer(32, 64, "cpu", lib=lib)


def test_runtime_fp8_packer_validates_kind_and_names_the_fallback():
    runtime = SparseRuntime("cpu")
    with pytest.raises(ValueError, match="auto, learned or cutlass"):
        runtime.fp8_packer(32, 64, kind="fast")
    assert isinstance(runtime.fp8_packer(32, 64, kind="cutlass"), LibraryFp8Packer)
    logs = []
    # no torchao op on CPU: learning fails, "auto" logs why and keeps the library's packer
    packer = runtime.fp8_packer(64, 64, kind="auto", log=logs.append)
    assert isinstance(packer, LibraryFp8Packer)
    assert len(logs) == 1 and "using torchao's packer" in logs[0]
    assert runtime.fp8_packer(64, 64, kind="auto", log=logs.append) is packer and len(logs) == 1  # kept
    # another runtime shares nothing: it builds (and logs) its own
    assert SparseRuntime("cpu").fp8_packer(64, 64, kind="auto", log=logs.append) is not packer and len(logs) == 2


def half_width_packer(w, out=None):
    """A stand-in for a 2:4 packer: (values, metadata, row scales) of the shapes a 2:4 operand packs to."""
    m, k = w.shape
    return (torch.zeros(m, k // 2, dtype=E4M3), torch.zeros(m, k // 8, dtype=torch.uint8), torch.ones(m))


def test_fp8_kernel_reconfigured_after_a_pack_packs_the_new_ops(monkeypatch):
    """Ops switched from 2:4 to dense fp8 after a pack (bench_train's MODE+ops_dense on fp8_sparse_24): the next
    pack writes dense e4m3 operands, not into the 2:4 buffers of another shape."""
    import sys
    import types
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))  # the kernel imports torchao.ops
    monkeypatch.setitem(sys.modules, "torchao.ops", types.ModuleType("torchao.ops"))
    from nanochat.accel.sparse.fp8_kernel import Fp8SparseKernel
    from nanochat.accel.sparse.linear import SparseOp
    kern = Fp8SparseKernel(64, 96, "cpu")
    kern.configure(SparseOp(half_width_packer), SparseOp(half_width_packer))
    wm = torch.randn(64, 96) * transposable_mask_reference(torch.randn(64, 96))
    kern.pack(wm)
    assert kern.w_packed.shape == (64, 48) and kern.wt_packed.shape == (96, 32)
    kern.configure(None, None)
    kern.pack(wm)
    assert kern.describe() == "fwd dense fp8, dgrad dense fp8"
    assert kern.w_packed.shape == (64, 96) and kern.wt_packed.shape == (96, 64) and kern.w_meta is None
    assert kern.w_packed.dtype == E4M3 and kern.w_scale.numel() == 1
