"""
Quantizing and packing an fp8 2:4 weight operand once per step, into torchao's CUTLASS sm90 layout.

LearnedFp8Packer writes that layout itself, quantization fused in (a third less GPU time than quantize +
torchao's packer; still well above memory speed); it learns the layout from torchao's packer and checks
itself byte for byte against it, and a shape whose check fails keeps LibraryFp8Packer (quantization,
then torchao's packer). torchao is imported only when its packer runs.
"""

import torch

from nanochat.accel.sparse.compress import (CompressorMismatch, dense_from_codes, learn_metadata, metadata_bytes,
                                            metadata_tables)
from nanochat.accel.sparse.fp8_ops import E4M3, quantize_rows, quantize_rows_e4m3


def cutlass_pack(q):
    """torchao's CUTLASS sm90 packer: (values, metadata) of a row-major e4m3 2:4 matrix."""
    import torchao.ops  # noqa: F401  (registers torch.ops.torchao.*)
    return torch.ops.torchao.to_sparse_semi_structured_cutlass_sm9x_f8(q)


class LibraryFp8Packer:
    """Row-wise e4m3 quantization (compiled by `compiler` if given), then torchao's CUTLASS packer."""
    name = "cutlass"

    def __init__(self, compiler=None):
        self.quantize = compiler(quantize_rows_e4m3) if compiler else quantize_rows_e4m3

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
    q, scale = quantize_rows(w, E4M3)
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
    against it; CompressorMismatch if they do not reproduce it. compiler: SparseRuntime.compiled, or None
    to run eagerly."""
    name = "learned"

    def __init__(self, m, k, device, lib=cutlass_pack, compiler=None, check_rounds=2):
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
        self.fn = compiler(_pack_learned) if compiler else _pack_learned
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


def make_fp8_packer(m, k, device, kind="auto", log=None, compiler=None):
    """LearnedFp8Packer where it reproduces torchao's bytes ("auto" or "learned"), else LibraryFp8Packer
    ("auto" after logging why, or "cutlass"). SparseRuntime.fp8_packer keeps one per shape and kind."""
    if kind not in ("auto", "learned", "cutlass"):
        raise ValueError(f"unknown fp8 packer {kind!r}: use auto, learned or cutlass")
    if kind != "cutlass":
        try:
            return LearnedFp8Packer(m, k, device, compiler=compiler)
        except Exception as e:  # a layout it cannot reproduce (CompressorMismatch), or a compile failure
            if kind == "learned":
                raise
            if log:
                log(f"fp8 2:4 packer for {m}x{k}: the learned layout does not match torchao's ({e}); using torchao's packer")
    return LibraryFp8Packer(compiler)
