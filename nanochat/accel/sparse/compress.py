"""
Compressing a 2:4 matrix into cuSPARSELt's layout at GPU memory speed.

cuSPARSELt's own compress is slow for what it does (0.09-0.5 ms for a 5120x1280 to 8192x2048 weight on
H100, ~10x under memory speed), and training compresses W and W^T of every sparse layer once per
optimizer step. Its compressed layout (cuSPARSELt 0.8) is: the two values kept in every group of 4 along
a row, row-major (m x k/2 bf16), then m*k/8 bytes of metadata holding two 2-bit positions per group in
a bit order NVIDIA does not document.

LearnedCompressor learns that bit order for one shape from the library itself: it compresses probe
matrices whose groups all keep the same positions except for the groups selected by one bit of the
group index, and reads which metadata bits changed. It learns, the same way, which two positions the
library stores for groups keeping fewer than two entries. It then checks itself byte for byte against
the library on random 2:4 matrices; a shape whose check fails keeps the library's compress
(LibraryCompressor). The learned compressor is a handful of gathers, compiled by torch.compile.
"""

import torch

# The four metadata fields of a group: bit f of (a | b << 2), a < b the two stored positions.
_FIELDS = {  # field: (pair without the bit, pair with it), patterns that differ in that bit alone
    0: ((0, 3), (1, 3)),  # a, low bit
    1: ((0, 3), (2, 3)),  # a, high bit
    2: ((0, 2), (0, 3)),  # b, low bit
    3: ((0, 1), (0, 3)),  # b, high bit
}


def _pattern(pair):
    return (1 << pair[0]) | (1 << pair[1])


def dense_from_codes(codes, m, k, values=None, dtype=torch.bfloat16):
    """(m, k) matrix whose group g keeps the positions set in codes[g] (4-bit), with value 1 or values[g, pos]."""
    bits = (codes.unsqueeze(-1) >> torch.arange(4, device=codes.device)) & 1
    dense = bits.to(dtype)
    if values is not None:
        dense = dense * values
    return dense.reshape(m, k)


def _bits(buf):
    """uint8 bytes -> bits, least significant first."""
    return ((buf.unsqueeze(-1) >> torch.arange(8, device=buf.device, dtype=torch.uint8)) & 1).reshape(-1).bool()


def _pack_bits(bits):
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.int32))
    return (bits.view(-1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def learn_metadata(meta_of, G, nbits, device):
    """Learn a library's metadata bit order for G groups from probes alone. meta_of(codes) compresses the
    matrix whose group g keeps the positions set in codes[g] (4-bit) and returns its nbits/8 metadata bytes.
    Returns (lut_a, lut_b, src_group, src_field, const_bits): the two positions a < b the library stores
    for each keep-pattern (16 entries, at most two kept), and for every metadata bit the group and field
    (bit f of a | b << 2; 4 for a bit that is constant) it holds, and the constant bits' values."""
    group = torch.arange(G, device=device)
    ones = torch.ones(G, dtype=torch.int64, device=device)
    src_group = torch.zeros(nbits, dtype=torch.int64, device=device)
    src_field = torch.full((nbits,), 4, dtype=torch.int64, device=device)
    for f, (without, with_) in _FIELDS.items():
        base = meta_of(ones * _pattern(without))
        changed = _bits(base ^ meta_of(ones * _pattern(with_)))
        pos = changed.nonzero().view(-1)
        if pos.numel() != G:
            raise CompressorMismatch(f"field {f}: {pos.numel()} metadata bits changed, expected one per group ({G})")
        owner = torch.zeros(G, dtype=torch.int64, device=device)
        for j in range(max(1, (G - 1).bit_length())):
            codes = torch.where((group >> j) & 1 == 1, _pattern(with_), _pattern(without))
            owner |= _bits(base ^ meta_of(codes))[pos].to(torch.int64) << j
        if not torch.equal(torch.sort(owner).values, group):
            raise CompressorMismatch(f"field {f}: metadata bits do not map one-to-one onto groups")
        if (src_field[pos] != 4).any():
            raise CompressorMismatch(f"field {f}: metadata bits shared with another field")
        src_group[pos], src_field[pos] = owner, f
    # positions stored for each mask pattern the library can get (at most 2 kept per group)
    lut_a = torch.zeros(16, dtype=torch.int64, device=device)
    lut_b = torch.ones(16, dtype=torch.int64, device=device)
    field_bits = src_field != 4
    first = {f: (src_field == f) & (src_group == 0) for f in range(4)}
    for code in range(16):
        if bin(code).count("1") > 2:
            continue
        bits = _bits(meta_of(ones * code))
        ab = sum(int(bits[first[f]].item()) << f for f in range(4))
        lut_a[code], lut_b[code] = ab & 3, ab >> 2
    const_bits = _bits(meta_of(ones * _pattern((0, 1)))) & ~field_bits
    return lut_a, lut_b, src_group, src_field, const_bits


def metadata_tables(lut_a, lut_b, src_group, src_field, const_bits, G):
    """("nibbles", (lut_a, lut_b, nibble_group)) when every metadata nibble is one group's four fields in order
    (one gather per nibble), else ("bits", (lut_a, lut_b, src_group, src_field, const_meta)), one gather per bit.
    The index tables are int32 and uint8: the compressor reads them every step, so their bytes count."""
    nbits = src_field.numel()
    fields_in_nibbles = (nbits == 4 * G and torch.equal(src_field.view(-1, 4), torch.arange(4, device=src_field.device).expand(G, 4))
                         and bool((src_group.view(-1, 4) == src_group.view(-1, 4)[:, :1]).all()))
    if fields_in_nibbles:
        return "nibbles", (lut_a, lut_b, src_group.view(-1, 4)[:, 0].to(torch.int32))
    return "bits", (lut_a, lut_b, src_group.to(torch.int32), src_field.to(torch.uint8), _pack_bits(const_bits))


def metadata_bytes(fields, layout, tables):
    """The metadata bytes of per-group fields (a | b << 2, uint8) in a learned layout (metadata_tables)."""
    if layout == "nibbles":
        nib = fields[tables[2]].view(-1, 2)
        return nib[:, 0] | (nib[:, 1] << 4)
    src_group, src_field, const_meta = tables[2:]
    bits = (fields[src_group] >> src_field) & 1
    shifts = torch.arange(8, device=fields.device, dtype=torch.int32)
    return (bits.view(-1, 8).to(torch.int32) << shifts).sum(-1).to(torch.uint8) | const_meta


class LibraryCompressor:
    """The library's own compress (W^T is transposed into a contiguous copy first)."""
    name = "cusparselt"

    def __init__(self, lib, m, k):
        self.lib, self.m, self.k = lib, m, k

    def __call__(self, wm, out):
        return self.lib.compress(wm.contiguous(), out)


class CompressorMismatch(Exception):
    """The learned layout does not reproduce the library's bytes: keep the library's compress."""


def _values_and_fields(wm, lut_a, lut_b):
    """The stored values (m, k/2) and per-group fields (a | b << 2, uint8) of the 2:4 matrix wm.
    The kept entries are its non-zeros (a kept exact zero stores as zero wherever it sits)."""
    m, k = wm.shape
    nz = (wm.reshape(m, k // 4, 4) != 0).to(torch.int64)
    code = nz[..., 0] | (nz[..., 1] << 1) | (nz[..., 2] << 2) | (nz[..., 3] << 3)  # (m, k/4) in 0..15
    a, b = lut_a[code], lut_b[code]
    w4 = wm.reshape(m, k // 4, 4)
    values = torch.stack([w4.gather(-1, a.unsqueeze(-1)), w4.gather(-1, b.unsqueeze(-1))], dim=-1)
    return values.reshape(-1), (a | (b << 2)).to(torch.uint8).reshape(-1)


def _compress_nibbles(wm, out_values, out_meta, lut_a, lut_b, nibble_group):
    """Metadata whose every nibble is one group's 4 fields in order: one gather per nibble."""
    values, fields = _values_and_fields(wm, lut_a, lut_b)
    out_values.copy_(values)
    out_meta.copy_(metadata_bytes(fields, "nibbles", (lut_a, lut_b, nibble_group)))


def _compress_bits(wm, out_values, out_meta, lut_a, lut_b, src_group, src_field, const_meta):
    """Any bit order: one gather per metadata bit (src_field 4 marks a constant bit, which reads 0)."""
    values, fields = _values_and_fields(wm, lut_a, lut_b)
    out_values.copy_(values)
    out_meta.copy_(metadata_bytes(fields, "bits", (lut_a, lut_b, src_group, src_field, const_meta)))


class LearnedCompressor:
    """Writes the library's compressed bytes of a 2:4 (m x k) matrix with a learned metadata bit order."""
    name = "learned"

    def __init__(self, lib, m, k, device, compiler=None, check_rounds=2):
        self.m, self.k = m, k
        device = torch.device(device)
        G = m * k // 4
        self.value_bytes = m * k  # m*k/2 bf16 values
        probe_out = lib.empty_compressed(m, k)
        total = probe_out.numel()
        if total < self.value_bytes + m * k // 8:
            raise CompressorMismatch(f"compressed size {total} B is smaller than values + metadata")

        def meta_of(codes):
            lib.compress(dense_from_codes(codes, m, k), probe_out)
            return probe_out[self.value_bytes:].clone()

        nbits = 8 * (total - self.value_bytes)
        self.layout, self.tables = metadata_tables(*learn_metadata(meta_of, G, nbits, device), G)
        fn = _compress_nibbles if self.layout == "nibbles" else _compress_bits
        # compiler: SparseRuntime.compiled (dynamic shapes, so one compiled graph serves every (m, k) per
        # memory order instead of one recompile per shape), or None to run eagerly
        self.fn = compiler(fn) if compiler else fn
        self._check(lib, device, check_rounds)

    def __call__(self, wm, out):
        """Compress wm (m x k bf16, 2:4 along rows, any strides) into out (lib.empty_compressed(m, k))."""
        self.fn(wm, out[:self.value_bytes].view(torch.bfloat16), out[self.value_bytes:], *self.tables)
        return out

    def _check(self, lib, device, rounds):
        """Byte-for-byte against the library: random values (never zero) under random 2:4 patterns,
        including groups that keep fewer than two, in W's and in W^T's memory order."""
        g = torch.Generator(device=device).manual_seed(1234)
        m, k = self.m, self.k
        patterns = torch.tensor([c for c in range(16) if bin(c).count("1") <= 2], device=device)
        for r in range(rounds):
            codes = patterns[torch.randint(0, len(patterns), (m * k // 4,), device=device, generator=g)]
            if r == 0:  # full 2:4 only: six patterns
                codes = torch.tensor([3, 5, 6, 9, 10, 12], device=device)[codes % 6]
            vals = torch.randn(m * k // 4, 4, device=device, generator=g).abs().add(0.5)
            vals = vals * torch.where(torch.rand(vals.shape, device=device, generator=g) < 0.5, -1.0, 1.0)
            dense = dense_from_codes(codes, m, k, vals.to(torch.bfloat16))
            want = lib.compress(dense, lib.empty_compressed(m, k))
            for layout in ("contiguous", "transposed"):
                wm = dense if layout == "contiguous" else dense.t().contiguous().t()
                got = self(wm, torch.empty_like(want))
                if not torch.equal(got, want):
                    bad = (got != want).nonzero().view(-1)
                    raise CompressorMismatch(f"{(got != want).sum().item()} of {want.numel()} bytes differ "
                                             f"({layout} input, round {r}, first at byte {bad[0].item()}, "
                                             f"values end at {self.value_bytes})")


def make_compressor(lib, m, k, device, kind="auto", log=None, compiler=None):
    """LearnedCompressor where it reproduces the library's bytes ("auto" or "learned"), else the library's.
    SparseRuntime.compressor keeps one per library and shape."""
    if kind in ("auto", "learned"):
        try:
            return LearnedCompressor(lib, m, k, device, compiler)
        except CompressorMismatch as e:
            if kind == "learned":
                raise
            if log:
                log(f"2:4 compressor for {m}x{k}: the learned layout does not match cuSPARSELt ({e}); using cuSPARSELt's compress")
    elif kind != "cusparselt":
        raise ValueError(f"unknown compressor {kind!r}: use auto, learned or cusparselt")
    return LibraryCompressor(lib, m, k)
