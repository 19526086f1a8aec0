"""
A fused 2:4 re-pack (not measured on a GPU yet, so not in the trainer): one Triton kernel reads a layer's fp32
master weight once and writes, for W and for W^T, the values of cuSPARSELt's compressed layout (straight into
the compressed buffers) and one 4-bit field per group (the two stored positions, a | b << 2); the metadata
bytes then come from compress.metadata_bytes with the layout the learned compressor found. Today's per-step
re-pack (nanochat/accel/sparse/linear.py: masked_bf16 + the learned compressor of W and of W^T) reads and writes
each weight several times over ~8 launches per layer; the fit in docs/measuring.md puts the mode's per-step
cost at 8.6 ms at d20 (3.6% of a one-micro-batch step).

The mask is transposable_mask_reference's rule exactly (greedy over each 4x4 tile by bf16 |w| descending, ties
to the earlier row-major position); torch's CUDA tile kernel orders ties its own way, so on exact ties (a zero
c_proj) the two can keep different entries of equal magnitude.

    python -m benchmarks.experimental.fused_repack --depths 20 26      # GPU: bytes against today's path, and time
CPU check of the kernel's logic (Triton's interpreter): tests/test_fused_repack.py.
"""

import argparse

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_mask_pack(w_ptr, lut_a_ptr, lut_b_ptr, vals_ptr, fields_ptr, vals_t_ptr, fields_t_ptr,
                    m, k, n_tiles, BLOCK: tl.constexpr):
    """BLOCK 4x4 tiles of w (m x k fp32, row-major) per program: the greedy transposable 2:4 mask, then for each
    tile row (a group of W) and tile column (a group of W^T) the two stored values (bf16 bits) and the field."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = t < n_tiles
    tiles_k = k // 4
    ti, tj = t // tiles_k, t % tiles_k
    e = tl.arange(0, 16)
    er, ec = e // 4, e % 4
    rows = 4 * ti[:, None] + er[None, :]
    cols = 4 * tj[:, None] + ec[None, :]
    x = tl.load(w_ptr + rows * k + cols, mask=live[:, None], other=0.0)
    # bf16 round-to-nearest-even by bits (the compute dtype's values are ranked and stored)
    bits = x.to(tl.uint32, bitcast=True)
    b16 = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    mag = ((b16 & 0x7FFF) << 16).to(tl.float32, bitcast=True)
    keep = tl.zeros((BLOCK, 16), dtype=tl.int32)
    seen = tl.zeros((BLOCK, 16), dtype=tl.int32)
    for _ in tl.static_range(16):
        idx = tl.argmax(tl.where(seen != 0, -1.0, mag), axis=1)
        hit = (e[None, :] == idx[:, None]).to(tl.int32)
        r, c = idx // 4, idx % 4
        row_n = tl.sum(tl.where(er[None, :] == r[:, None], keep, 0), axis=1)
        col_n = tl.sum(tl.where(ec[None, :] == c[:, None], keep, 0), axis=1)
        ok = ((row_n < 2) & (col_n < 2)).to(tl.int32)
        keep = keep | (hit * ok[:, None])
        seen = seen | hit
    kept_bits = tl.where(keep != 0, b16, 0)
    nz = ((kept_bits & 0x7FFF) != 0).to(tl.int32)  # the stored pattern: kept non-zeros (-0 counts as zero)
    for i in tl.static_range(4):
        # W: tile row i is group (4 ti + i, tj); W^T: tile column i is group (4 tj + i, ti)
        for transposed in tl.static_range(2):
            if transposed == 0:
                sel, pos = er == i, ec
            else:
                sel, pos = ec == i, er
            code = tl.sum(tl.where(sel[None, :], nz << pos[None, :], 0), axis=1)
            a = tl.load(lut_a_ptr + code)
            b = tl.load(lut_b_ptr + code)
            va = tl.sum(tl.where(sel[None, :] & (pos[None, :] == a[:, None]), kept_bits, 0), axis=1)
            vb = tl.sum(tl.where(sel[None, :] & (pos[None, :] == b[:, None]), kept_bits, 0), axis=1)
            field = (a | (b << 2)).to(tl.uint8)
            if transposed == 0:
                row, half, group = 4 * ti + i, 2 * tj, (4 * ti + i) * tiles_k + tj
                tl.store(vals_ptr + row * (k // 2) + half, va.to(tl.uint16), mask=live)
                tl.store(vals_ptr + row * (k // 2) + half + 1, vb.to(tl.uint16), mask=live)
                tl.store(fields_ptr + group, field, mask=live)
            else:
                row, half, group = 4 * tj + i, 2 * ti, (4 * tj + i) * (m // 4) + ti
                tl.store(vals_t_ptr + row * (m // 2) + half, va.to(tl.uint16), mask=live)
                tl.store(vals_t_ptr + row * (m // 2) + half + 1, vb.to(tl.uint16), mask=live)
                tl.store(fields_t_ptr + group, field, mask=live)


def fused_values_and_fields(w, lut_a, lut_b, vals=None, vals_t=None, block=64):
    """For the fp32 weight w (m x k): the compressed values of W (m x k/2) and of W^T (k x m/2) as bf16, written
    into vals / vals_t when given (views of the compressed buffers), and the uint8 fields of W's and W^T's groups."""
    m, k = w.shape
    assert w.dtype == torch.float32 and w.is_contiguous() and m % 4 == 0 and k % 4 == 0
    vals = torch.empty(m, k // 2, dtype=torch.bfloat16, device=w.device) if vals is None else vals
    vals_t = torch.empty(k, m // 2, dtype=torch.bfloat16, device=w.device) if vals_t is None else vals_t
    fields = torch.empty(m * k // 4, dtype=torch.uint8, device=w.device)
    fields_t = torch.empty(m * k // 4, dtype=torch.uint8, device=w.device)
    n_tiles = (m // 4) * (k // 4)
    _tile_mask_pack[(triton.cdiv(n_tiles, block),)](
        w, lut_a.to(torch.int32), lut_b.to(torch.int32), vals.view(torch.uint16), fields, vals_t.view(torch.uint16),
        fields_t, m, k, n_tiles, BLOCK=block)
    return vals, fields, vals_t, fields_t


def reference_values_and_fields(w, lut_a, lut_b):
    """The same from the reference mask and the learned compressor's own gathers."""
    from nanochat.accel.sparse.compress import _values_and_fields
    from nanochat.accel.sparse.mask import transposable_mask_reference
    wb = w.detach().to(torch.bfloat16)
    wm = torch.where(transposable_mask_reference(wb), wb, 0)
    vals, fields = _values_and_fields(wm, lut_a.long(), lut_b.long())
    vals_t, fields_t = _values_and_fields(wm.t().contiguous(), lut_a.long(), lut_b.long())
    m, k = w.shape
    return vals.view(m, k // 2), fields, vals_t.view(k, m // 2), fields_t


def main():
    """On a GPU: per d20/d26 MLP shape, the fused re-pack's compressed bytes against today's path (both from the
    reference mask, so that ties cannot differ) and the GPU time of each (today's path with its CUDA tile mask)."""
    from nanochat.accel.hardware import time_gpu_ms
    from nanochat.accel.sparse.compress import metadata_bytes
    from nanochat.accel.sparse.mask import masked_bf16, transposable_mask_reference
    from nanochat.accel.sparse.runtime import SparseRuntime
    from nanochat.gpt import config_from_depth

    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--depths", type=int, nargs="+", default=[20, 26])
    args = p.parse_args()
    runtime = SparseRuntime("cuda")
    lib = runtime.library("nvmath")
    meta_bytes = runtime.compiled(metadata_bytes)  # compiled, as the learned compressor's own gathers are
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | cuSPARSELt {lib.version}")
    print("| depth | weight | today: mask + compress W, W^T (ms) | fused (ms) | bytes equal |")
    print("|---|---|---|---|---|")
    for depth in args.depths:
        d = config_from_depth(depth, vocab_size=32768, sequence_len=2048).n_embd
        for m, k in ((4 * d, d), (d, 4 * d)):
            w = torch.randn(m, k, device="cuda") * k ** -0.5
            comp, comp_t = runtime.compressor("nvmath", m, k), runtime.compressor("nvmath", k, m)
            if comp.name != "learned" or comp_t.name != "learned" or comp.layout != "nibbles":
                print(f"| {depth} | {m}x{k} | the learned layout is not 'nibbles' here: not compared | | |")
                continue
            out, out_t = lib.empty_compressed(m, k), lib.empty_compressed(k, m)

            def today():
                wm = masked_bf16(w)
                comp(wm, out)
                comp_t(wm.t(), out_t)

            lut_a, lut_b = comp.tables[0], comp.tables[1]
            fout, fout_t = torch.empty_like(out), torch.empty_like(out_t)

            def fused():
                _, fields, _, fields_t = fused_values_and_fields(
                    w, lut_a, lut_b, fout[:m * k].view(torch.bfloat16).view(m, k // 2),
                    fout_t[:m * k].view(torch.bfloat16).view(k, m // 2))
                fout[m * k:].copy_(meta_bytes(fields, "nibbles", comp.tables))
                fout_t[m * k:].copy_(meta_bytes(fields_t, "nibbles", comp_t.tables))

            # the same mask on both sides: today's compressors on the reference-masked weight
            wb = w.to(torch.bfloat16)
            wm_ref = torch.where(transposable_mask_reference(wb), wb, 0)
            comp(wm_ref, out)
            comp_t(wm_ref.t(), out_t)
            fused()
            equal = torch.equal(out, fout) and torch.equal(out_t, fout_t)
            print(f"| {depth} | {m}x{k} | {time_gpu_ms(today):.3f} | {time_gpu_ms(fused):.3f} | {equal} |")


if __name__ == "__main__":
    main()
