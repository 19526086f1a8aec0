"""CPU tests of nanochat/accel/sparse/: mask rules, straight-through gradients, conversion, messages,
checkpoints, once-per-step packing, torch.compile. GPU kernels: tests/test_sparse_gpu.py."""


import pytest
import torch
import torch.nn as nn

from nanochat.accel.sparse import (CusparseltKernel, SemiSparseLinear, SparseConfig, convert_mlp_to_sparse,
                             install_refresh_hooks, refresh_sparse_weights, transposable_mask_reference)
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from tests.gloo_workers import spawn_gloo


def convert(model, device="cpu", log=None, **settings):
    return convert_mlp_to_sparse(model, device, SparseConfig(log=log or (lambda *a: None), **settings))


def tiny_gpt(seed=0, n_layer=2, d=64):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=d))
    model.init_weights()
    return model


def group_counts(mask):
    """Kept entries per group of 4 along rows and along columns."""
    N, K = mask.shape
    return mask.reshape(N, K // 4, 4).sum(-1), mask.reshape(N // 4, 4, K).sum(1)


def greedy_one_tile(a):
    """Plain-Python greedy of one 4x4 tile of magnitudes (ties: earlier position first)."""
    order = sorted(range(16), key=lambda i: (-a[i // 4][i % 4], i))
    rows, cols, keep = [0] * 4, [0] * 4, set()
    for i in order:
        r, c = divmod(i, 4)
        if rows[r] < 2 and cols[c] < 2:
            keep.add(i); rows[r] += 1; cols[c] += 1
    return keep

# -----------------------------------------------------------------------------
# mask

def test_mask_rules_and_quality():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    mask = transposable_mask_reference(w)
    rows, cols = group_counts(mask)
    assert rows.max() <= 2 and cols.max() <= 2  # transposable: W and W^T both 2:4
    assert (rows == 2).float().mean() > 0.9 and (cols == 2).float().mean() > 0.9  # greedy rarely stalls
    assert 0.45 < mask.float().mean() <= 0.5
    a = w.to(torch.bfloat16).float().abs()
    kept = (a * mask).sum()
    # unconstrained row-wise top-2 of 4 (upper bound on what any 2:4 row mask keeps)
    top2 = a.reshape(256, 128, 4).topk(2, dim=-1).values.sum()
    assert kept >= 0.85 * top2
    # naive transposable baseline: the fixed positional pattern (what all-zero weights get)
    fixed = transposable_mask_reference(torch.zeros_like(w))
    assert kept > 1.2 * (a * fixed).sum()


def test_mask_matches_plain_python_greedy():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    w[0, :8] = 0.5  # some exact ties
    mask = transposable_mask_reference(w)
    a = w.to(torch.bfloat16).float().abs()
    for ti in range(4):
        for tj in range(8):
            tile = a[4 * ti:4 * ti + 4, 4 * tj:4 * tj + 4].tolist()
            got = {i for i in range(16) if mask[4 * ti + i // 4, 4 * tj + i % 4]}
            assert got == greedy_one_tile(tile)


def test_mask_zero_weights_deterministic():
    mask = transposable_mask_reference(torch.zeros(16, 32))
    tile = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask, tile.repeat(4, 8))
    rows, cols = group_counts(mask)
    assert (rows == 2).all() and (cols == 2).all()

# -----------------------------------------------------------------------------
# layer

# On CPU the cuSPARSELt kernel object has no library: both its ops run dense on the masked weight (the
# fallback every untuned shape takes); the cuSPARSELt GEMMs themselves are tested in tests/test_sparse_gpu.py.
@pytest.mark.parametrize("kernel", ["masked", "cusparselt"], ids=["masked", "cusparselt_kernel_dense_fallback"])
def test_straight_through_gradients(kernel):
    torch.manual_seed(0)
    lin = nn.Linear(64, 128, bias=False)
    layer = SemiSparseLinear.from_linear(lin, CusparseltKernel() if kernel == "cusparselt" else None)
    if kernel == "cusparselt":
        assert layer.kernel.describe() == "fwd dense, dgrad dense"
    assert layer.weight is lin.weight
    layer.refresh()  # the first pack (convert_mlp_to_sparse does it for a model)
    x = torch.randn(3, 7, 64, requires_grad=True)  # odd token count, leading dims
    y = layer(x)
    mask = transposable_mask_reference(lin.weight)
    wm = (lin.weight * mask).detach().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    yr = xr @ wm.t()
    torch.testing.assert_close(y, yr)
    r = torch.randn_like(y)
    (y * r).sum().backward()
    (yr * r).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    # dense weight gets the dense gradient of the pruned weight: gy^T x, not masked
    torch.testing.assert_close(layer.weight.grad, wm.grad)
    assert (layer.weight.grad[~mask] != 0).float().mean() > 0.99

# -----------------------------------------------------------------------------
# conversion and messages

def test_convert_masked_counts_names_and_message():
    model = tiny_gpt()
    params_before = {n: p for n, p in model.named_parameters()}
    logs = []
    n = convert(model, backend="masked", log=logs.append)
    assert n == 4
    names = sorted(name for name, m in model.named_modules() if isinstance(m, SemiSparseLinear))
    assert names == ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                     "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    assert logs[0] == "✓ 2:4 sparsity enabled - converted 4 MLP layers to SemiSparseLinear"
    assert any(line.startswith("2:4 kernels: masked: 4 layers") for line in logs[1:])
    # the very same Parameter objects (optimizer groups built later still work)
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert not isinstance(model.transformer.h[0].attn.c_q, SemiSparseLinear)
    assert not isinstance(model.lm_head, SemiSparseLinear)


@pytest.mark.parametrize("backend", ["auto", "cusparselt"])
def test_convert_on_cpu_warns_and_stays_dense(backend):
    model = tiny_gpt()
    logs = []
    assert convert(model, torch.device("cpu"), backend=backend, log=logs.append) == 0
    assert logs == ["Warning: 2:4 sparsity requires CUDA, ignoring --sparse flag"]
    assert not any(isinstance(m, SemiSparseLinear) for m in model.modules())


def test_convert_old_gpu_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    model = tiny_gpt()
    logs = []
    assert convert(model, torch.device("cuda", 0), log=logs.append) == 0
    assert len(logs) == 1 and "7.5" in logs[0] and logs[0].startswith("Warning")


def test_unknown_backend():
    with pytest.raises(UserError) as e:
        convert(tiny_gpt(), backend="cutlass")
    assert "\n" not in str(e.value)

# -----------------------------------------------------------------------------
# checkpoints and once-per-step packing

def train_steps(model, steps, micro=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(123)
    for _ in range(steps):
        refresh_sparse_weights(model)
        for _ in range(micro):
            idx = torch.randint(0, 256, (2, 16), generator=g)
            model(idx, idx).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def test_checkpoint_round_trip():
    model = tiny_gpt()
    convert(model, backend="masked")
    train_steps(model, 2)
    refresh_sparse_weights(model)  # the last step's weights (the trainer's post-optimizer hook)
    sd = model.state_dict()
    assert set(sd) == set(tiny_gpt().state_dict())  # dense weights only, no packed buffers
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(idx)
    model2 = tiny_gpt(seed=99)
    convert(model2, backend="masked")
    model2.load_state_dict(sd)
    assert refresh_sparse_weights(model2) == 4  # load bumped the weights' versions: masks recomputed
    with torch.no_grad():
        torch.testing.assert_close(model2(idx), ref, rtol=0, atol=0)


def test_refresh_once_per_step():
    model = tiny_gpt()
    convert(model, backend="masked")
    layers = [m for m in model.modules() if isinstance(m, SemiSparseLinear)]
    assert all(m.num_packs == 1 for m in layers)  # packed at conversion
    assert refresh_sparse_weights(model) == 0  # unchanged: no-op
    train_steps(model, 3, micro=3)
    # 3 optimizer steps: packed at conversion + once after each of the first 2 steps (by the
    # trainer-style refresh), never per micro-batch; the 3rd step's weights are not packed yet
    assert all(m.num_packs == 3 for m in layers)
    assert refresh_sparse_weights(model) == 4
    assert refresh_sparse_weights(model) == 0
    # the packed weight follows the new weights
    m = layers[0]
    torch.testing.assert_close(m.kernel.wm, m.weight.detach() * transposable_mask_reference(m.weight))

# -----------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("backend", ["masked", "cusparselt"], ids=["masked", "cusparselt_kernel_dense_fallback"])
def test_compile_matches_eager_and_no_recompile(backend):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256, bias=False), nn.ReLU(), nn.Linear(256, 64, bias=False))
    holder = nn.Module(); holder.block = nn.Module(); holder.block.mlp = mlp  # names block.mlp.0, block.mlp.2
    assert convert(holder, backend="masked") == 2
    if backend == "cusparselt":  # the cuSPARSELt kernel object (untuned: both ops dense off CUDA)
        for name in ("0", "2"):
            setattr(mlp, name, SemiSparseLinear.from_linear(getattr(mlp, name), CusparseltKernel()))
            assert getattr(mlp, name).kernel.describe() == "fwd dense, dgrad dense"
    cnt = CompileCounterWithBackend("aot_eager")
    cmlp = torch.compile(mlp, backend=cnt)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1)
    for step in range(3):
        refresh_sparse_weights(holder)
        x = torch.randn(2, 9, 64)
        y = cmlp(x)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in mlp.parameters()]
        opt.zero_grad()
        y_eager = mlp(x)  # eager reference on the same packed weights
        y_eager.square().sum().backward()
        torch.testing.assert_close(y, y_eager)
        for g, p in zip(grads, mlp.parameters()):
            torch.testing.assert_close(g, p.grad)
        opt.step()
        opt.zero_grad()
    assert cnt.frame_count == 1  # in-place packed buffers: no recompiles across steps


def test_compile_inductor_gpt():
    torch._dynamo.reset()
    model = tiny_gpt(n_layer=1, d=64)
    convert(model, backend="masked")
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(idx, idx)
    cmodel = torch.compile(model)
    loss = cmodel(idx, idx)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    loss.backward()
    assert model.transformer.h[0].mlp.c_proj.weight.grad.abs().sum() > 0

# -----------------------------------------------------------------------------
# re-pack hooks: after each optimizer step and after load_state_dict, never per micro-batch

def test_refresh_hooks_pack_once_per_optimizer_step():
    from nanochat.optim import setup_optimizers
    model = tiny_gpt()
    convert(model, backend="masked")
    opts = setup_optimizers(model, 0.2, 0.004, 0.02, 0.0, "cpu")  # AdamW + Muon (the MLP weights)
    install_refresh_hooks(model, opts)
    layers = [m for m in model.modules() if isinstance(m, SemiSparseLinear)]
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        for _ in range(3):  # micro-batches: no packs
            idx = torch.randint(0, 256, (2, 16), generator=g)
            model(idx, idx).backward()
        assert all(m.num_packs == 1 + step for m in layers)
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
        assert all(m.num_packs == 2 + step for m in layers)  # the step's hook re-packed each layer once
        torch.testing.assert_close(layers[0].kernel.wm, layers[0].weight.detach() * transposable_mask_reference(layers[0].weight))
    assert refresh_sparse_weights(model) == 0
    # load_state_dict re-packs from the loaded weights
    other = tiny_gpt(seed=5)
    model.load_state_dict(other.state_dict())
    assert all(m.num_packs == 4 for m in layers)
    w = layers[1].weight
    torch.testing.assert_close(layers[1].kernel.wm, w.detach() * transposable_mask_reference(w))

# -----------------------------------------------------------------------------
# settings, fallbacks, the timing cache and the decision rule (no GPU needed)

def test_pick_impl_without_nvmath(monkeypatch):
    import builtins
    from nanochat.accel.sparse import cusparselt
    real_import = builtins.__import__

    def no_nvmath(name, *args, **kwargs):
        if name.startswith("nvmath"):
            raise ImportError("No module named 'nvmath'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_nvmath)
    impl, reason = cusparselt.pick_impl("auto")
    assert impl == "torch" and "nvmath-python unavailable" in reason and "\n" not in reason
    assert cusparselt.pick_impl("torch")[0] == "torch"
    with pytest.raises(RuntimeError, match="pip install nvmath-python"):
        cusparselt.pick_impl("nvmath")
    with pytest.raises(ValueError):
        cusparselt.pick_impl("cublas")


def one_choice(base_ms, fast_ms, prep_ms=0.0, micro_batches=1, margin=None, force=None):
    """kernel_choice.choose on one op with these timings and per-step cost: whether the fast kernel runs."""
    from nanochat.accel.kernel_choice import MARGINS, TimingCache, choose
    chosen = choose([(16, 16)], ("op",), key=lambda shape, op: "op", time_fn=lambda shape, op: {"base": base_ms, "fast": fast_ms},
                    cost=lambda shape, op, t: (t["base"], t["fast"], prep_ms), cache=TimingCache(),
                    margin=MARGINS["2:4"] if margin is None else margin, micro_batches=micro_batches, force=force)
    return chosen[(16, 16)]["op"].fast


def test_the_2to4_choice_weighs_saving_per_step_against_compression():
    # a bf16 GEMM 0.42 ms on 2:4 against 0.58 ms dense saves 0.16 ms per call; prep is its compression per step
    assert one_choice(0.58, 0.42, prep_ms=0.15, micro_batches=1)
    assert not one_choice(0.58, 0.42, prep_ms=0.17, micro_batches=1)
    assert one_choice(0.58, 0.42, prep_ms=0.60, micro_batches=4)
    assert one_choice(0.214, 0.180, 0.0, 16)  # faster alone: the whole-step gate decides on/off
    assert not one_choice(0.5, 0.6, 0.0, 16)  # slower alone
    assert one_choice(0.5, 0.6, 0.0, 1, force=True) and not one_choice(0.58, 0.42, 0.0, 1, force=False)
    assert one_choice(0.58, 0.42, prep_ms=0.10, micro_batches=1, margin=1.08)  # the margin is a parameter
    assert not one_choice(0.58, 0.42, prep_ms=0.13, micro_batches=1, margin=1.08)  # 0.58 - 1.08 * 0.42 = 0.126


def test_the_fp8_2to4_choice_weighs_gemm_saving_against_pack():
    # d20's c_fc in fp8: 2:4 saves 0.04 ms a GEMM; prep = pack - cast = 0.23 - 0.03 = 0.20 ms per step
    sparse_ms, dense_ms, prep = 0.25, 0.29, 0.23 - 0.03
    assert not one_choice(dense_ms, sparse_ms, prep, micro_batches=4, margin=1.0)
    assert one_choice(dense_ms, sparse_ms, prep, micro_batches=8, margin=1.0)  # 0.32 ms > 0.20
    assert not one_choice(dense_ms, sparse_ms, prep, micro_batches=8, margin=1.08)  # 0.16 ms < 0.20
    assert one_choice(dense_ms, sparse_ms, prep, micro_batches=64)  # the default 2:4 margin 1.0: 64 x 0.04 > 0.20
    assert not one_choice(0.29, 0.30, 0.0, micro_batches=64, margin=1.0)  # slower alone


def _rank_choice(rank, world):
    from nanochat.common import rank0s
    return rank0s({"fwd": rank == 0, "dgrad": 10 + rank})


def test_kernel_choices_are_rank0s_on_every_rank(tmp_path):
    """Timings differ between ranks; the kernels (and packed buffers) must not."""
    from nanochat.common import rank0s
    assert rank0s({"fwd": 3}) == {"fwd": 3}  # no process group: unchanged
    assert spawn_gloo(_rank_choice, 2, tmp_path) == [{"fwd": True, "dgrad": 10}] * 2


# -----------------------------------------------------------------------------
# the custom op finds its library through an integer handle

class DenseStandIn:
    """A cuSPARSELt stand-in on CPU: the 'compressed' operand is the dense matrix itself."""

    def matmul(self, c, x, m, alg):
        self.calls.append((x.shape[0], alg))
        return x @ c.t()


def test_spmm_op_takes_a_library_handle_and_compiles_to_one_graph():
    import gc

    from torch._dynamo.testing import CompileCounterWithBackend

    from nanochat.accel.sparse.cusparselt import TOKEN_PAD, Library
    lib = type("StandIn", (Library, DenseStandIn), {})("cpu")
    lib.calls = []
    a, x = torch.randn(48, 64), torch.randn(37, 64)  # 37 tokens: padded to TOKEN_PAD inside the op
    y = torch.ops.nanochat_sparse.spmm(x, a, 48, 3, lib.handle)
    torch.testing.assert_close(y, x @ a.t())
    assert lib.calls == [(64, 3)] and 64 % TOKEN_PAD == 0
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda x_: torch.ops.nanochat_sparse.spmm(x_, a, 48, 3, lib.handle).relu(), backend=cnt, fullgraph=True)
    for _ in range(2):
        torch.testing.assert_close(fn(x), (x @ a.t()).relu())
    assert cnt.frame_count == 1
    torch._dynamo.reset()
    other = type("StandIn", (Library, DenseStandIn), {})("cpu")
    handle = other.handle
    assert handle != lib.handle and Library.from_handle(handle) is other
    del other
    gc.collect()
    with pytest.raises(KeyError):  # the handle table keeps nothing alive
        Library.from_handle(handle)


def test_eager_forward_refuses_a_stale_pack():
    """forward never packs: a weight written outside the optimizer step's hook must be synced before eager use."""
    model = tiny_gpt()
    convert(model, backend="masked")
    idx = torch.randint(0, 256, (2, 16))
    model(idx)  # packed at conversion
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    with pytest.raises(RuntimeError, match="changed since its last pack"):
        model(idx)
    assert refresh_sparse_weights(model) == 1
    model(idx)
