"""GPU tests of the cuSPARSELt path (skipped without CUDA). Run on an H100 by `bash benchmarks/gpu.sh tests`.

Tolerance: bf16 operands, fp32 accumulation: relative Frobenius error ||out - ref|| / ||ref|| < 1e-2
against a float32 masked-dense reference on the same bf16-rounded operands (expected ~2e-3); NaN fails.
Fresh random inputs for every check; both cuSPARSELt implementations (nvmath-python plans, torch._cslt_*)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.accel.kernel_choice import TimingCache
from nanochat.accel.sparse import (DENSE, SemiSparseLinear, SparseConfig, SparseRuntime, convert_mlp_to_sparse,
                             install_refresh_hooks, refresh_sparse_weights, transposable_mask, transposable_mask_reference)
from nanochat.accel.sparse.compress import LearnedCompressor
from nanochat.accel.sparse.cusparselt import nvmath_status
from nanochat.gpt import MLP as GPTMLP, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = 1e-2
IMPLS = ["nvmath", "torch"]


def rel(a, b):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def runtime():
    """Each test its own runtime: libraries, plans and compressors never carry over between tests."""
    return SparseRuntime("cuda")


@pytest.fixture(params=IMPLS)
def impl(request):
    if request.param == "nvmath" and not nvmath_status()[0]:
        pytest.skip(nvmath_status()[1])
    return request.param


def holder_with_mlp(d, c_proj_std=0.02):
    """A module with .block.mlp = the model's own MLP (c_fc -> relu² -> c_proj) at width d."""
    holder = nn.Module()
    holder.block = nn.Module()
    holder.block.mlp = GPTMLP(GPTConfig(n_embd=d)).cuda()
    with torch.no_grad():
        holder.block.mlp.c_proj.weight.normal_(0, c_proj_std)  # it starts at zero in the model
    return holder


def test_gpu_mask_matches_reference():
    torch.manual_seed(0)
    # no ties: every 4x4 tile holds 16 distinct magnitudes (1 + k/16, exact in bf16), random signs and scales
    N, K = 256, 512
    mags = 1 + torch.argsort(torch.rand(N // 4 * K // 4, 16), dim=1).float() / 16
    scale = 2.0 ** torch.randint(-8, 2, (N // 4 * K // 4, 1)).float()
    tiles = (mags * scale * torch.where(torch.rand(mags.shape) < 0.5, -1.0, 1.0)).reshape(N // 4, K // 4, 4, 4)
    w = tiles.permute(0, 2, 1, 3).reshape(N, K).cuda()
    assert torch.equal(transposable_mask(w).cpu(), transposable_mask_reference(w.cpu()))
    w = torch.randn(3072, 768, device="cuda")  # random normal: equal up to ties
    g, r = transposable_mask(w).cpu(), transposable_mask_reference(w.cpu())
    assert (g != r).float().mean() < 0.01
    for m in (g, r):
        assert m.reshape(3072, 192, 4).sum(-1).max() <= 2 and m.reshape(768, 4, 768).sum(1).max() <= 2


@pytest.mark.parametrize("m,k", [(3072, 768), (768, 3072), (5120, 1280), (1280, 5120), (8192, 2048)])
def test_learned_compressor_matches_cusparselt_bytes(m, k, impl, runtime):
    """Its own check (in __init__) compares bytes on random 2:4 matrices; here: real transposable masks
    of a normal weight, in W's and W^T's memory order, and the same bytes as the other implementation."""
    lib = runtime.library(impl)
    comp = LearnedCompressor(lib, m, k, "cuda", runtime.compiled)
    w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    mask = transposable_mask(w)
    wm = torch.where(mask, w, 0)
    want = lib.compress(wm, lib.empty_compressed(m, k))
    assert torch.equal(comp(wm, lib.empty_compressed(m, k)), want)
    wt = torch.randn(k, m, device="cuda", dtype=torch.bfloat16)  # a (m x k) view of W^T's memory
    mt = transposable_mask(wt)
    wmt = torch.where(mt, wt, 0)
    want_t = lib.compress(wmt.t().contiguous(), lib.empty_compressed(m, k))
    assert torch.equal(comp(wmt.t(), lib.empty_compressed(m, k)), want_t)
    print(f"\ncompressor {m}x{k} ({impl}): {comp.layout} layout")
    if impl == "nvmath":
        torch_lib = runtime.library("torch")
        assert torch.equal(torch_lib.compress(wm, torch_lib.empty_compressed(m, k)), want)


@pytest.mark.parametrize("d", [256, 768, 1280, 2048])
@pytest.mark.parametrize("T", [77, 2 * 1031, 4096])
@pytest.mark.parametrize("proj", [False, True])
def test_cusparselt_matches_fp32_reference(d, T, proj, impl, runtime):
    torch.manual_seed(d + T)
    fin, fout = (4 * d, d) if proj else (d, 4 * d)
    holder = nn.Module()
    holder.block = nn.Module()
    holder.block.mlp = nn.Module()
    holder.block.mlp.lin = nn.Linear(fin, fout, bias=False, device="cuda")  # converted: under `.mlp.`
    config = SparseConfig(force="sparse", tokens=T, impl=impl, log=print)
    assert convert_mlp_to_sparse(holder, "cuda", config, runtime) == 1
    layer = holder.block.mlp.lin
    assert layer.kernel.fwd_alg != DENSE and layer.kernel.dgrad_alg != DENSE and layer.kernel.wm is None
    assert layer.kernel.library is runtime.library(impl)  # the kernel uses the runtime it was handed
    x = torch.randn(T, fin, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x.view(1, T, fin))
    assert y.dtype == torch.bfloat16 and y.shape == (1, T, fout)
    gy = torch.randn_like(y)
    y.backward(gy)
    wb = layer.weight.detach().bfloat16().float()
    wm = torch.where(transposable_mask(layer.weight), wb, 0)
    assert (wm != 0).float().mean() > 0.45
    xb, gyf = x.detach().bfloat16().float(), gy[0].float()
    assert rel(y[0], xb @ wm.t()) < TOL
    assert rel(x.grad, gyf @ wm) < TOL
    assert rel(layer.weight.grad, gyf.t() @ xb) < TOL  # dense straight-through grad_W
    assert layer.weight.grad.dtype == torch.float32


def test_nvmath_equals_torch_path_bit_for_bit(runtime):
    if not nvmath_status()[0]:
        pytest.skip(nvmath_status()[1])
    torch.manual_seed(3)
    nv, th = runtime.library("nvmath"), runtime.library("torch")
    for (m, k, T) in [(5120, 1280, 4096), (1280, 5120, 2062), (3072, 768, 77)]:
        w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wm = torch.where(transposable_mask(w), w, 0)
        x = torch.randn(T, k, device="cuda", dtype=torch.bfloat16)
        for alg in (0, 1):
            y_nv = torch.ops.nanochat_sparse.spmm(x, nv.compress(wm, nv.empty_compressed(m, k)), m, alg, nv.handle)
            y_th = torch.ops.nanochat_sparse.spmm(x, th.compress(wm, th.empty_compressed(m, k)), m, alg, th.handle)
            assert torch.equal(y_nv, y_th), (m, k, T, alg)
            assert rel(y_nv, x.float() @ wm.float().t()) < TOL


def test_plans_built_once_per_shape(runtime):
    if not nvmath_status()[0]:
        pytest.skip(nvmath_status()[1])
    lib = runtime.library("nvmath")
    m, k, T = 2304, 576, 1024
    w = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    c = lib.compress(torch.where(transposable_mask(w), w, 0), lib.empty_compressed(m, k))
    assert lib.num_plans() == 0  # a fresh runtime holds no plans
    for _ in range(5):
        torch.ops.nanochat_sparse.spmm(torch.randn(T, k, device="cuda", dtype=torch.bfloat16), c, m, 0, lib.handle)
    assert lib.num_plans() == 1
    torch.ops.nanochat_sparse.spmm(torch.randn(T - 5, k, device="cuda", dtype=torch.bfloat16), c, m, 0, lib.handle)
    assert lib.num_plans() == 1  # T-5 pads to the same T
    torch.ops.nanochat_sparse.spmm(torch.randn(2 * T, k, device="cuda", dtype=torch.bfloat16), c, m, 0, lib.handle)
    assert lib.num_plans() == 2


@pytest.mark.parametrize("d", [768, 2048])
def test_compiled_mlp_matches_reference(d, impl):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(d)
    holder = holder_with_mlp(d)
    T = 3 * 1031  # odd token count
    config = SparseConfig(force="sparse", tokens=T, impl=impl, log=print)
    assert convert_mlp_to_sparse(holder, "cuda", config) == 2
    cnt = CompileCounterWithBackend("inductor")
    m = holder.block.mlp
    cmlp = torch.compile(m, backend=cnt)
    opt = torch.optim.SGD(m.parameters(), lr=1e-3)
    install_refresh_hooks(holder, [opt])
    for step in range(2):
        x = torch.randn(3, 1031, d, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = cmlp(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        # fp32 masked-dense reference on the bf16-rounded operands
        w1 = torch.where(transposable_mask(m.c_fc.weight), m.c_fc.weight.detach().bfloat16(), 0).float().requires_grad_()
        w2 = torch.where(transposable_mask(m.c_proj.weight), m.c_proj.weight.detach().bfloat16(), 0).float().requires_grad_()
        xr = x.detach().bfloat16().float().requires_grad_()
        yr = F.relu(xr @ w1.t()).square().bfloat16().float() @ w2.t()
        yr.backward(gy.float())
        assert rel(y, yr) < TOL
        assert rel(x.grad, xr.grad) < TOL
        assert rel(m.c_fc.weight.grad, w1.grad) < TOL
        assert rel(m.c_proj.weight.grad, w2.grad) < TOL
        opt.step()  # the hook re-packs both layers
        opt.zero_grad(set_to_none=True)
    assert cnt.frame_count == 1  # one graph, no graph breaks, no recompile after the in-place repack


def test_repack_after_optimizer_step_changes_packed_bytes(impl, runtime):
    torch.manual_seed(4)
    holder = holder_with_mlp(768)
    convert_mlp_to_sparse(holder, "cuda", SparseConfig(force="sparse", tokens=4096, impl=impl, log=print), runtime)
    m = holder.block.mlp
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    install_refresh_hooks(holder, [opt])
    c_before, ct_before = m.c_fc.kernel.c.clone(), m.c_fc.kernel.ct.clone()
    ptrs = (m.c_fc.kernel.c.data_ptr(), m.c_fc.kernel.ct.data_ptr())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m(torch.randn(4096, 768, device="cuda")).square().sum().backward()
    assert torch.equal(m.c_fc.kernel.c, c_before)  # micro-batches never re-pack
    packs = m.c_fc.num_packs
    opt.step()
    assert m.c_fc.num_packs == packs + 1
    assert not torch.equal(m.c_fc.kernel.c, c_before) and not torch.equal(m.c_fc.kernel.ct, ct_before)
    assert ptrs == (m.c_fc.kernel.c.data_ptr(), m.c_fc.kernel.ct.data_ptr())  # in place
    lib = runtime.library(impl)
    w = m.c_fc.weight
    wm = torch.where(transposable_mask(w), w.detach().bfloat16(), 0)
    assert torch.equal(m.c_fc.kernel.c, lib.compress(wm, lib.empty_compressed(*wm.shape)))
    assert refresh_sparse_weights(holder) == 0


def test_cuda_graph_replays_after_in_place_weight_change():
    """A CUDA-graph capture of a sparse forward+backward sees re-packed weights on replay."""
    impl = "nvmath" if nvmath_status()[0] else "torch"
    torch.manual_seed(5)
    holder = holder_with_mlp(1280)
    T = 4096
    convert_mlp_to_sparse(holder, "cuda", SparseConfig(force="sparse", tokens=T, impl=impl, log=print))
    m = holder.block.mlp
    x = torch.randn(T, 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(T, 1280, device="cuda", dtype=torch.bfloat16)

    def step():
        y = m(x)
        y.backward(gy)
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: plans, workspaces, autograd buffers
            step()
            x.grad = None
            m.zero_grad(set_to_none=False)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    for trial in range(2):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)  # in place, like an optimizer step
        refresh_sparse_weights(holder)  # compresses into the buffers the graph reads
        graph.replay()
        torch.cuda.synchronize()
        w1 = torch.where(transposable_mask(m.c_fc.weight), m.c_fc.weight.detach().bfloat16(), 0).float()
        w2 = torch.where(transposable_mask(m.c_proj.weight), m.c_proj.weight.detach().bfloat16(), 0).float()
        h = F.relu(x.detach().float() @ w1.t()).square()
        assert rel(y_static, h.bfloat16().float() @ w2.t()) < TOL, trial


def test_trainer_conversion_packs_once_per_step_and_tunes(tmp_path):
    from nanochat.gpt import GPT
    from nanochat.optim import setup_optimizers
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)).cuda()
    model.init_weights()
    lines = []
    config = SparseConfig(backend="cusparselt", tokens=8 * 256, micro_batches=4, timing_cache=TimingCache(str(tmp_path / "t.json")), log=lines.append)
    assert convert_mlp_to_sparse(model, "cuda", config) == 4
    print("\n".join(lines))
    assert any(line.startswith("2:4 kernels for 2 layers of weight 1024x256") for line in lines)
    assert (tmp_path / "t.json").exists()
    layers = [m for m in model.modules() if isinstance(m, SemiSparseLinear)]
    opts = setup_optimizers(model, 0.2, 0.004, 0.02, 0.0, "cuda")
    install_refresh_hooks(model, opts)
    cmodel = torch.compile(model)
    for step in range(3):
        for micro in range(4):
            idx = torch.randint(0, 512, (8, 256), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cmodel(idx, idx)
            loss.backward()
        assert torch.isfinite(loss)
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        assert all(m.num_packs == 2 + step for m in layers)  # conversion + one per optimizer step
    # a second conversion reads the timings from the cache instead of searching
    lines2 = []
    model2 = GPT(GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)).cuda()
    model2.init_weights()
    convert_mlp_to_sparse(model2, "cuda", SparseConfig(backend="cusparselt", tokens=8 * 256, micro_batches=4, timing_cache=TimingCache(str(tmp_path / "t.json")),
                                                       log=lines2.append))
    # where no op pays, the layers hold the masked kernel, which has no algorithm ids: compare what each op runs
    assert [m.kernel.describe() for m in sparse_layers_of(model2)] == [m.kernel.describe() for m in layers]


def sparse_layers_of(model):
    return [m for m in model.modules() if isinstance(m, SemiSparseLinear)]
