"""nanochat/loss.py: the chunked linear + soft-cap + cross-entropy gives the plain formula's loss and
gradients (any chunk size, every reduction, ignored targets, autocast, torch.compile) without ever
holding the whole batch's logits."""

import pytest
import torch

from nanochat.loss import default_chunk_size, linear_softcap_cross_entropy, reference_linear_softcap_cross_entropy

N, D, V, SOFTCAP = 100, 32, 50, 15.0


def inputs(seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(N, D, generator=g)  # large enough logits that the soft-cap bends them
    w = torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[::7] = -1
    return x, w, t


def loss_and_grads(fn, x, w, t, reduction="mean", grad_out=None, **kw):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(x, w, t, SOFTCAP, ignore_index=-1, reduction=reduction, **kw)
    (loss if grad_out is None else loss * grad_out).sum().backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, N, 1000])  # 7 and 16 leave a partial last chunk
def test_chunked_matches_the_plain_formula_fp32(reduction, chunk_size):
    x, w, t = inputs()
    grad_out = torch.randn(N) if reduction == "none" else None  # per-token weights for backward
    ref = loss_and_grads(reference_linear_softcap_cross_entropy, x, w, t, reduction, grad_out)
    got = loss_and_grads(linear_softcap_cross_entropy, x, w, t, reduction, grad_out, chunk_size=chunk_size)
    for r, g, what in zip(ref, got, ("loss", "grad x", "grad weight")):
        assert g.dtype == r.dtype == torch.float32 and g.shape == r.shape, what
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6, msg=what)
    if reduction == "none":
        assert (got[0][t == -1] == 0).all()


def test_chunk_size_changes_nothing_but_rounding():
    x, w, t = inputs(seed=1)
    base = loss_and_grads(linear_softcap_cross_entropy, x, w, t, chunk_size=N)
    for cs in (3, 33, 64):
        got = loss_and_grads(linear_softcap_cross_entropy, x, w, t, chunk_size=cs)
        for b, g in zip(base, got):
            torch.testing.assert_close(g, b, rtol=1e-5, atol=1e-7)


def test_without_grad_gives_the_same_losses():
    x, w, t = inputs()
    with torch.no_grad():
        got = linear_softcap_cross_entropy(x, w, t, SOFTCAP, reduction="none", chunk_size=9)
        ref = reference_linear_softcap_cross_entropy(x, w, t, SOFTCAP, reduction="none")
    assert not got.requires_grad and got.shape == (N,)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # inputs that do not require grad take the same no-grad path, grad mode or not
    torch.testing.assert_close(linear_softcap_cross_entropy(x, w, t, SOFTCAP), ref[t != -1].mean(), rtol=1e-6, atol=0)


def test_autocast_keeps_the_plain_formulas_numerics():
    """Under autocast the matmuls run in bf16 and everything after them in fp32, as in the plain formula:
    grad x is the same per-row computation (equal), grad weight differs by where bf16 rounds the sums."""
    x, w, t = inputs(seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(reference_linear_softcap_cross_entropy, x, w, t)
        got = loss_and_grads(linear_softcap_cross_entropy, x, w, t, chunk_size=16)
    assert [g.dtype for g in got] == [torch.float32] * 3
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[2], ref[2], rtol=0.02, atol=2e-3 * ref[2].abs().max().item())
    fp32 = loss_and_grads(reference_linear_softcap_cross_entropy, x, w, t)
    assert (got[0] - fp32[0]).abs() > 1e-6  # autocast really did run the matmul in bf16


def test_grad_output_scales_the_saved_gradients():
    x, w, t = inputs(seed=3)
    ref = loss_and_grads(reference_linear_softcap_cross_entropy, x, w, t, grad_out=torch.tensor(0.25))
    got = loss_and_grads(linear_softcap_cross_entropy, x, w, t, grad_out=torch.tensor(0.25), chunk_size=16)
    for r, g in zip(ref[1:], got[1:]):
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-6)


def test_default_chunk_is_512_mib_of_fp32_logits_at_nanochat_vocab():
    assert default_chunk_size(32768) == 4096
    assert default_chunk_size(1 << 30) == 1


def test_never_holds_the_whole_batch_of_logits():
    """Peak memory of forward + backward (eager, CPU, torch's MemTracker): the plain formula holds
    several full fp32 logits tensors at once; the chunked one less than one."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    n, d, v = 4096, 32, 2048
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, requires_grad=True)
    w = torch.randn(v, d, generator=g, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    logits_bytes = n * v * 4
    peaks = {}
    for name, fn, kw in (("reference", reference_linear_softcap_cross_entropy, {}),
                         ("chunked", linear_softcap_cross_entropy, dict(chunk_size=128))):
        mt = mem_tracker.MemTracker()
        mt.track_external(x, w)
        with mt:
            fn(x, w, t, SOFTCAP, **kw).backward()
        peaks[name] = mt.get_tracker_snapshot("peak")[x.device]["Total"]
        x.grad = w.grad = None
    assert peaks["reference"] > 2 * logits_bytes
    assert peaks["chunked"] < 0.5 * logits_bytes


def test_compiles_without_graph_breaks():
    x, w, t = inputs(seed=4)
    fn = torch.compile(linear_softcap_cross_entropy, backend="aot_eager", fullgraph=True, dynamic=False)
    for reduction, grad_out in (("mean", None), ("none", torch.randn(N))):
        ref = loss_and_grads(linear_softcap_cross_entropy, x, w, t, reduction, grad_out, chunk_size=16)
        got = loss_and_grads(fn, x, w, t, reduction, grad_out, chunk_size=16)
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
