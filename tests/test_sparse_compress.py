"""CPU tests of the learned 2:4 compressor (nanochat/accel/sparse/compress.py) against stand-in libraries
whose metadata bit order is scrambled: the compressor must learn it from probes alone and reproduce
the library's bytes, and must refuse (CompressorMismatch) a layout it cannot reproduce."""

import pytest
import torch

from nanochat.accel.sparse.compress import CompressorMismatch, LearnedCompressor, LibraryCompressor, make_compressor
from nanochat.accel.sparse.mask import transposable_mask_reference


class ScrambledLibrary:
    """A cuSPARSELt stand-in: values row-major (2 per group of 4), then metadata with the 4 bits
    (a_lo, a_hi, b_lo, b_hi) of every group at random bit positions among some constant padding
    bits. Groups with fewer than 2 non-zeros store the highest free positions (unlike ours)."""

    def __init__(self, m, k, seed=0, pad_bytes=8, swap_fields=False, nibbles=False):
        g = torch.Generator().manual_seed(seed)
        self.m, self.k = m, k
        G = m * k // 4
        self.nbits = 4 * G + (0 if nibbles else 8 * pad_bytes)
        if nibbles:  # each group's 4 bits stay together and in order, the nibbles shuffled
            self.perm = (4 * torch.randperm(G, generator=g)).unsqueeze(-1).add(torch.arange(4)).reshape(-1)
        else:
            self.perm = torch.randperm(self.nbits, generator=g)[:4 * G]
        self.const = torch.randint(0, 2, (self.nbits,), generator=g).bool()
        self.swap_fields = swap_fields

    def empty_compressed(self, m, k):
        return torch.empty(m * k + self.nbits // 8, dtype=torch.uint8)

    def compress(self, a, out):
        m, k = a.shape
        a4 = a.reshape(m, k // 4, 4)
        nz = a4 != 0
        assert nz.sum(-1).max() <= 2
        score = nz.to(torch.int64) * 8 + torch.arange(4)
        idx = score.topk(2, dim=-1).indices.sort(dim=-1).values
        out[:m * k].view(torch.bfloat16).copy_(a4.gather(-1, idx).reshape(-1))
        a_, b_ = idx[..., 0].reshape(-1), idx[..., 1].reshape(-1)
        if self.swap_fields:  # a layout that is not a bit permutation: b's bits depend on a
            b_ = b_ ^ a_
        fields = torch.stack([a_ & 1, a_ >> 1, b_ & 1, b_ >> 1], dim=-1).reshape(-1).bool()
        bits = self.const.clone()
        bits[self.perm] = fields
        meta = (bits.view(-1, 8).to(torch.int32) << torch.arange(8)).sum(-1).to(torch.uint8)
        out[m * k:].copy_(meta)
        return out


@pytest.mark.parametrize("m,k,nibbles", [(64, 32, False), (32, 128, False), (64, 64, True)])
def test_learned_compressor_reproduces_library_bytes(m, k, nibbles):
    lib = ScrambledLibrary(m, k, seed=m + k, nibbles=nibbles)
    comp = LearnedCompressor(lib, m, k, "cpu")  # its own byte check runs in __init__
    assert comp.layout == ("nibbles" if nibbles else "bits")
    torch.manual_seed(0)
    for transposed in (False, True):
        w = torch.randn(k, m).t() if transposed else torch.randn(m, k)  # W^T's memory order too
        mask = transposable_mask_reference(w.contiguous())
        mask = mask.t().contiguous().t() if transposed else mask
        wm = torch.where(mask, w, 0).to(torch.bfloat16)
        want = lib.compress(wm.contiguous(), lib.empty_compressed(m, k))
        got = comp(wm, lib.empty_compressed(m, k))
        assert torch.equal(got, want)
    # a kept position holding an exact zero (c_proj starts at zero): the mask decides, not the value
    wz = torch.zeros(m, k, dtype=torch.bfloat16)
    got = comp(wz, lib.empty_compressed(m, k))
    assert (got[:m * k] == 0).all()


def test_learned_compressor_refuses_a_layout_it_cannot_reproduce():
    lib = ScrambledLibrary(32, 64, swap_fields=True)
    with pytest.raises(CompressorMismatch):
        LearnedCompressor(lib, 32, 64, "cpu")
    logs = []
    comp = make_compressor(lib, 32, 64, "cpu", "auto", log=logs.append)
    assert isinstance(comp, LibraryCompressor) and len(logs) == 1 and "using cuSPARSELt's compress" in logs[0]
    with pytest.raises(CompressorMismatch):
        make_compressor(lib, 32, 64, "cpu", "learned")


class ValuesSwappedLibrary(ScrambledLibrary):
    """The stand-in with each group's two values stored in the other order (b's value first), its metadata
    unchanged: the probes, which read metadata only, cannot tell it from ScrambledLibrary."""

    def compress(self, a, out):
        super().compress(a, out)
        values = out[:self.m * self.k].view(torch.bfloat16).view(-1, 2)
        values.copy_(values.flip(-1).clone())
        return out


def test_learned_compressor_refuses_values_stored_in_another_order():
    m, k = 32, 64
    with pytest.raises(CompressorMismatch, match=rf"bytes differ \(contiguous input, round 0, first at byte \d+, "
                                                 rf"values end at {m * k}\)") as e:
        LearnedCompressor(ValuesSwappedLibrary(m, k), m, k, "cpu")
    assert int(e.value.args[0].split("first at byte ")[1].split(",")[0]) < m * k  # a value byte, not metadata
    logs = []
    assert isinstance(make_compressor(ValuesSwappedLibrary(m, k), m, k, "cpu", "auto", log=logs.append), LibraryCompressor)
    assert len(logs) == 1
    assert isinstance(LearnedCompressor(ScrambledLibrary(m, k), m, k, "cpu"), LearnedCompressor)  # same metadata, accepted


class LastGroupSwappedLibrary(ScrambledLibrary):
    """The stand-in with only the last group's two values stored in the other order: one position of the
    layout differs from the learned one."""

    def compress(self, a, out):
        super().compress(a, out)
        last = out[self.m * self.k - 4:self.m * self.k].view(torch.bfloat16)
        last.copy_(last.flip(0).clone())
        return out


def test_learned_compressor_refuses_a_layout_differing_in_one_position():
    m, k = 32, 64
    with pytest.raises(CompressorMismatch, match=r"contiguous input, round 0") as e:
        LearnedCompressor(LastGroupSwappedLibrary(m, k), m, k, "cpu")
    first = int(e.value.args[0].split("first at byte ")[1].split(",")[0])
    assert m * k - 4 <= first < m * k  # the last group's value bytes, and nothing before them
