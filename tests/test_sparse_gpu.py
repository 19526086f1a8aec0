"""GPU tests of the cuSPARSELt path (skipped without CUDA). Run on an H100 by benchmarks/gpu_sparse.sh.

Tolerance: bf16 operands, fp32 accumulation: relative Frobenius error ||out - ref|| / ||ref|| < 1e-2
against a float32 masked-dense reference on the same bf16-rounded operands (expected ~2e-3); NaN fails."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import MLP as GPTMLP, GPTConfig
from nanochat import sparse
from nanochat.sparse import (SemiSparseLinear, convert_mlp_to_sparse, refresh_sparse_weights,
                             transposable_mask, transposable_mask_reference)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = 1e-2


def rel(a, b):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=["sparse", "auto"])
def mode(request):
    """sparse: cuSPARSELt forced for fwd and dgrad; auto: the timed per-shape choice (maybe dense)."""
    sparse.FORCE = "sparse" if request.param == "sparse" else None
    yield request.param
    sparse.FORCE = None


def test_gpu_mask_matches_reference():
    torch.manual_seed(0)
    # no ties: every 4x4 tile holds 16 distinct magnitudes (1 + k/16, exact in bf16), random signs and scales
    N, K = 256, 512
    mags = 1 + torch.argsort(torch.rand(N // 4 * K // 4, 16), dim=1).float() / 16
    scale = 2.0 ** torch.randint(-8, 2, (N // 4 * K // 4, 1)).float()
    tiles = (mags * scale * torch.where(torch.rand(mags.shape) < 0.5, -1.0, 1.0)).reshape(N // 4, K // 4, 4, 4)
    w = tiles.permute(0, 2, 1, 3).reshape(N, K).cuda()
    assert torch.equal(transposable_mask(w).cpu(), transposable_mask_reference(w.cpu()))
    # random normal weights: equal up to ties (bf16 has few distinct values, ties do occur)
    w = torch.randn(3072, 768, device="cuda")
    g, r = transposable_mask(w).cpu(), transposable_mask_reference(w.cpu())
    assert (g != r).float().mean() < 0.01
    for m in (g, r):
        assert m.reshape(3072, 192, 4).sum(-1).max() <= 2 and m.reshape(768, 4, 768).sum(1).max() <= 2


@pytest.mark.parametrize("d", [256, 768, 1280, 2048])
@pytest.mark.parametrize("T", [77, 2 * 1031])
@pytest.mark.parametrize("proj", [False, True])
def test_cusparselt_matches_fp32_reference(d, T, proj, mode):
    torch.manual_seed(d + T)
    fin, fout = (4 * d, d) if proj else (d, 4 * d)
    lin = nn.Linear(fin, fout, bias=False, device="cuda")
    layer = SemiSparseLinear.from_linear(lin, backend="cusparselt")
    x = torch.randn(T, fin, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x.view(1, T, fin))
    assert y.dtype == torch.bfloat16 and y.shape == (1, T, fout)
    gy = torch.randn_like(y)
    y.backward(gy)
    wm = layer.kernel.wm.float()  # the layer's own mask (== reference up to ties, tested above)
    wb = lin.weight.detach().bfloat16().float()
    assert torch.equal(wm[wm != 0], wb[wm != 0]) and (wm != 0).float().mean() > 0.45
    xb, gyf = x.detach().bfloat16().float(), gy[0].float()
    assert rel(y[0], xb @ wm.t()) < TOL
    assert rel(x.grad, gyf @ wm) < TOL
    assert rel(lin.weight.grad, gyf.t() @ xb) < TOL  # dense straight-through grad_W
    assert lin.weight.grad.dtype == torch.float32


def MLP(d):
    """The model's own MLP block (c_fc -> relu² -> c_proj) at width d."""
    return GPTMLP(GPTConfig(n_embd=d))


@pytest.mark.parametrize("d", [768, 2048])
def test_compiled_mlp_matches_reference(d, mode):
    from torch._dynamo.testing import CompileCounterWithBackend
    if d == 768 and mode == "auto":
        pytest.skip("compile time: auto mode is covered at d=2048")
    torch._dynamo.reset()
    torch.manual_seed(d)
    holder = nn.Module()
    holder.block = nn.Module()
    holder.block.mlp = MLP(d).cuda()  # names block.mlp.c_fc, block.mlp.c_proj
    with torch.no_grad():
        holder.block.mlp.c_proj.weight.normal_(0, 0.02)
    assert convert_mlp_to_sparse(holder, "cuda", backend="cusparselt", log=print) == 2
    cnt = CompileCounterWithBackend("inductor")
    cmlp = torch.compile(holder.block.mlp, backend=cnt)
    opt = torch.optim.SGD(holder.block.mlp.parameters(), lr=1e-3)
    for step in range(2):
        refresh_sparse_weights(holder)
        x = torch.randn(3, 1031, d, device="cuda", requires_grad=True)  # odd token count
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = cmlp(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        # fp32 masked-dense reference on the bf16-rounded operands
        m = holder.block.mlp
        w1 = m.c_fc.kernel.wm.float().requires_grad_()
        w2 = m.c_proj.kernel.wm.float().requires_grad_()
        xr = x.detach().bfloat16().float().requires_grad_()
        yr = F.relu(xr @ w1.t()).square().bfloat16().float() @ w2.t()
        yr.backward(gy.float())
        assert rel(y, yr) < TOL
        assert rel(x.grad, xr.grad) < TOL
        assert rel(m.c_fc.weight.grad, w1.grad) < TOL
        assert rel(m.c_proj.weight.grad, w2.grad) < TOL
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert cnt.frame_count == 1  # one graph, no graph breaks, no recompile after the in-place repack


def test_prune_once_per_step(monkeypatch):
    from nanochat.gpt import GPT, GPTConfig
    calls = []
    real = torch._cslt_compress
    monkeypatch.setattr(torch, "_cslt_compress", lambda w: calls.append(w.shape) or real(w))
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)).cuda()
    model.init_weights()
    assert convert_mlp_to_sparse(model, "cuda", log=print) == 4
    layers = [m for m in model.modules() if isinstance(m, SemiSparseLinear)]
    cmodel = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        if step == 1:
            calls.clear()  # step 0 autotuned (it compresses random weights of the same shapes)
        refresh_sparse_weights(model)
        for micro in range(4):
            idx = torch.randint(0, 512, (8, 256), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cmodel(idx, idx)
            loss.backward()
        assert torch.isfinite(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    # steps 1 and 2 repacked every layer once (step 0 used the conversion's pack), not per micro-batch;
    # each pack compresses W and/or W^T for the ops the first tuned T put on cuSPARSELt
    assert all(m.num_packs == 3 for m in layers)
    assert len(calls) == 2 * sum(len(sparse._SPARSE_OPS[(m.out_features, m.in_features)]) for m in layers)
    assert refresh_sparse_weights(model) == 4 and refresh_sparse_weights(model) == 0
