"""benchmarks/experimental/fused_repack.py: the fused re-pack kernel writes what the reference mask and the learned
compressor's gathers write (values and fields of W and W^T). On CPU through Triton's interpreter, where Triton is
installed (it is not a dependency: CI skips this); on a GPU compiled."""

import os

import pytest
import torch



@pytest.fixture(scope="module")
def fused():
    """The module, its kernel run by Triton's interpreter where there is no GPU (TRITON_INTERPRET is read when
    triton and the kernel are imported and when the kernel runs: set for this module's tests)."""
    interpret = not torch.cuda.is_available()
    old = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        from benchmarks.experimental import fused_repack
        yield fused_repack
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def luts(g):
    """Stored positions per 4-bit keep-pattern as a library might learn them: the kept pair where two are kept,
    else any pair (random), so the kernel must read the table rather than derive it."""
    lut_a = torch.randint(0, 4, (16,), generator=g)
    lut_b = torch.randint(0, 4, (16,), generator=g)
    for code in range(16):
        kept = [p for p in range(4) if code >> p & 1]
        if len(kept) == 2:
            lut_a[code], lut_b[code] = kept
    return lut_a, lut_b


@pytest.mark.parametrize("m,k", [(4, 4), (8, 16), (32, 12), (24, 40)])
def test_fused_repack_matches_reference(fused, m, k):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(m * 100 + k)
    lut_a, lut_b = luts(g)
    cases = {
        "random": torch.randn(m, k, generator=g),
        "zeros": torch.zeros(m, k),  # c_proj at init: every tile ties
        "ties": torch.randint(-2, 3, (m, k), generator=g).float(),  # many equal magnitudes, zeros, no -0
        "neg_zero_and_tiny": torch.where(torch.rand(m, k, generator=g) < 0.3, -0.0, torch.randn(m, k, generator=g) * 1e-30),
        "bf16_rounding": 1 + torch.randint(0, 4, (m, k), generator=g).float() * 2 ** -9,  # fp32 values that round to ties
    }
    for name, w in cases.items():
        w = w.to(dev).contiguous()
        got = fused.fused_values_and_fields(w, lut_a.to(dev), lut_b.to(dev), block=4)
        want = fused.reference_values_and_fields(w, lut_a.to(dev), lut_b.to(dev))
        for what, x, y in zip(("values", "fields", "values_t", "fields_t"), got, want):
            assert x.shape == y.shape, (name, what)
            assert torch.equal(x.view(torch.uint8), y.contiguous().view(torch.uint8)), (name, what)
