"""GPU tests of nanochat/accel/fp8.py and nanochat/accel/sparse/fp8_*.py: Fp8SparseKernel against a float32
masked-dense reference, and a few compiled training steps with convert_to_float8. Skipped without CUDA >= 8.9 and torchao.

Tolerances (relative Frobenius error against float32): e4m3 keeps 3 mantissa bits, so rounding
one operand costs up to 2^-4 = 6% per element (~2% RMS); a product of two quantized operands
lands at ~2-4% relative error. Outputs: 0.06. grad-output in e5m2 (2 mantissa bits) and fp8 grad-weight
(e5m2 x e4m3, tensorwise), as the kernel computes them: 0.10. Measured values are printed (pytest -s).
"""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.accel.converters import LayerPlan, LinearConverter
from nanochat.accel.fp8 import convert_to_float8
from nanochat.accel.hardware import fp8_sparse_supported, fp8_supported
from nanochat.accel.sparse import SparseOp, SparseRuntime
from nanochat.accel.sparse.fp8_kernel import Fp8SparseKernel
from nanochat.accel.sparse.fp8_pack import LearnedFp8Packer, LibraryFp8Packer

DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
FP8_OK, FP8_WHY = fp8_supported(DEV)
SPARSE_OK, SPARSE_WHY = fp8_sparse_supported(DEV)
pytestmark = pytest.mark.skipif(not FP8_OK, reason=f"fp8 not supported: {FP8_WHY}")
needs_sm90 = pytest.mark.skipif(not SPARSE_OK, reason=f"fp8 2:4 not supported: {SPARSE_WHY}")

TOL_FP8 = 0.06
TOL_BF16 = 0.01
TOL_E5M2 = 0.10


def rel_err(a, ref):
    a, ref = a.float(), ref.float()
    assert torch.isfinite(a).all(), "NaN/inf in result"
    return ((a - ref).norm() / ref.norm()).item()


def masked_weight(out_f, in_f, scale=1.0):
    """Random bf16 weight with a transposable 2:4 mask (W and W^T both 2:4)."""
    w = torch.randn(out_f, in_f, device=DEV, dtype=torch.bfloat16) * scale
    *_, bitmask = torch._sparse_semi_structured_tile(w, algorithm="largest_abs_values_greedy", use_cutlass=True)
    return torch._sparse_semi_structured_apply_dense(w, bitmask)


def assert_transposable_24(wm):
    nz = (wm != 0).int()
    assert nz.view(wm.shape[0], -1, 4).sum(-1).max() <= 2
    assert nz.t().contiguous().view(wm.shape[1], -1, 4).sum(-1).max() <= 2


def check_kernel(kern, wm, lead, fn, tol_gx=TOL_FP8, tol_gw=TOL_BF16, tag=""):
    """Fresh random x, gy; compare y, grad-x, grad-w of fn (kernel.linear) with float32 math."""
    out_f, in_f = wm.shape
    weight = nn.Parameter(wm.float().clone())  # fp32 master weight (values unused by the kernel)
    x = torch.randn(*lead, in_f, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(*lead, out_f, device=DEV, dtype=torch.bfloat16)
    y = fn(x, weight)
    y.backward(gy)
    assert y.dtype == torch.bfloat16 and y.shape == (*lead, out_f)
    assert x.grad.shape == x.shape and weight.grad.shape == weight.shape and weight.grad.dtype == torch.float32
    w32, x32, g32 = wm.float(), x.detach().float(), gy.float()
    e_y = rel_err(y, x32 @ w32.t())
    e_gx = rel_err(x.grad, g32 @ w32)
    e_gw = rel_err(weight.grad, g32.reshape(-1, out_f).t() @ x32.reshape(-1, in_f))  # straight-through: unmasked
    print(f"\nERR {tag} {out_f}x{in_f} lead={tuple(lead)}: y={e_y:.4f} gx={e_gx:.4f} gw={e_gw:.4f}")
    assert e_y < TOL_FP8 and e_gx < tol_gx and e_gw < tol_gw, (e_y, e_gx, e_gw)


SHAPES = [(3072, 768), (768, 3072), (5120, 1280), (1280, 5120), (8192, 2048), (2048, 8192)]


@needs_sm90
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_fp8_sparse_kernel_matches_reference(shape, compiled):
    torch.manual_seed(0)
    torch._dynamo.reset()  # each kernel object is a new guard on the same code: stay under the recompile limit
    out_f, in_f = shape
    wm = masked_weight(out_f, in_f, in_f ** -0.5)
    assert_transposable_24(wm)
    kern = Fp8SparseKernel(out_f, in_f, DEV, SparseRuntime(DEV))
    kern.pack(wm)
    fn = torch.compile(kern.linear, fullgraph=True) if compiled else kern.linear
    for lead in [(4096,), (3, 333)]:  # odd token count: padded to the kernel's alignment
        check_kernel(kern, wm, lead, fn, tol_gx=TOL_E5M2, tol_gw=TOL_E5M2,
                     tag=f"tensorwise {'compiled' if compiled else 'eager'}")


@needs_sm90
@pytest.mark.parametrize("ops", [(False, False), (True, False), (False, True)], ids=["dense-dense", "2:4-dense", "dense-2:4"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", [(5120, 1280), (1280, 5120), (3072, 768)], ids=["5120x1280", "1280x5120", "3072x768"])
def test_fp8_kernel_with_dense_ops_matches_reference(shape, compiled, ops):
    """Ops the per-shape choice sends to dense fp8 (cuBLAS on the masked weight, cast once per pack)."""
    torch.manual_seed(3)
    torch._dynamo.reset()
    out_f, in_f = shape
    wm = masked_weight(out_f, in_f, in_f ** -0.5)
    runtime = SparseRuntime(DEV)
    kern = Fp8SparseKernel(out_f, in_f, DEV, runtime)
    kern.configure(*(SparseOp(LibraryFp8Packer(runtime.compiled)) if sparse else None for sparse in ops))
    kern.pack(wm)
    assert (kern.w_meta is None) != ops[0] and (kern.wt_meta is None) != ops[1]
    fn = torch.compile(kern.linear, fullgraph=True) if compiled else kern.linear
    for lead in [(4096,), (3, 333)]:
        check_kernel(kern, wm, lead, fn, tol_gx=TOL_E5M2, tol_gw=TOL_E5M2, tag=f"ops={ops} {'compiled' if compiled else 'eager'}")


PACK_SHAPES = [(3072, 768), (768, 3072), (5120, 1280), (1280, 5120), (6656, 1664), (1664, 6656)]


@needs_sm90
@pytest.mark.parametrize("shape", PACK_SHAPES, ids=[f"{o}x{i}" for o, i in PACK_SHAPES])
def test_learned_fp8_packer_matches_torchao(shape):
    """The learned packer checks itself byte for byte against torchao's packer when it is built (exact
    inputs, scale 1). On trained-like weights, in W's and W^T's memory order, its metadata must equal
    torchao's on the library's own quantization, and its values nearly all (the two quantizations are
    different compiled kernels: a rounding may differ by one step)."""
    torch.manual_seed(4)
    m, k = shape
    runtime = SparseRuntime(DEV)
    learned = LearnedFp8Packer(m, k, DEV, compiler=runtime.compiled)
    library = LibraryFp8Packer(runtime.compiled)
    print(f"\nLAYOUT {m}x{k}: {learned.layout}")
    wm = masked_weight(m, k, k ** -0.5)
    wm[:64] = 0  # all-zero groups, as c_proj at init
    for w in (wm, wm.t().contiguous().t()):
        values, meta, scale = learned(w)
        want_values, want_meta, want_scale = library(w)
        assert torch.equal(meta, want_meta)
        torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
        differ = (values.view(torch.uint8) != want_values.view(torch.uint8)).float().mean().item()
        assert differ < 1e-4, differ
        assert torch.equal(values.float() == 0, want_values.float() == 0)


@needs_sm90
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("shape", [(5120, 1280), (1664, 6656)], ids=["5120x1280", "1664x6656"])
def test_fp8_kernel_with_learned_packers_matches_reference(shape, compiled):
    torch.manual_seed(5)
    torch._dynamo.reset()
    out_f, in_f = shape
    wm = masked_weight(out_f, in_f, in_f ** -0.5)
    runtime = SparseRuntime(DEV)
    kern = Fp8SparseKernel(out_f, in_f, DEV, runtime)
    kern.configure(SparseOp(runtime.fp8_packer(out_f, in_f, "learned")), SparseOp(runtime.fp8_packer(in_f, out_f, "learned")))
    kern.pack(wm)
    fn = torch.compile(kern.linear, fullgraph=True) if compiled else kern.linear
    for lead in [(4096,), (3, 333)]:
        check_kernel(kern, wm, lead, fn, tol_gx=TOL_E5M2, tol_gw=TOL_E5M2, tag=f"learned {'compiled' if compiled else 'eager'}")
    ptrs = [t.data_ptr() for t in kern.packed_buffers()]
    wm2 = masked_weight(out_f, in_f, in_f ** -0.5)
    kern.pack(wm2)  # in place
    assert ptrs == [t.data_ptr() for t in kern.packed_buffers()]
    check_kernel(kern, wm2, (4096,), fn, tol_gx=TOL_E5M2, tol_gw=TOL_E5M2, tag="learned repacked")


@needs_sm90
def test_fp8_time_ops_and_choice():
    """time_fp8_ops measures every op (finite, positive times), with every number the choice's cost reads."""
    from nanochat.accel.sparse.tune import time_fp8_ops
    t = time_fp8_ops(5120, 1280, 8192, DEV)
    print("\nTIMES", t)
    assert set(t) == {"fwd", "dgrad"}
    assert all(0 < v < 100 for op in t.values() for v in op.values())
    assert all(set(op) == {"sparse_ms", "dense_ms", "pack_ms", "cast_ms"} for op in t.values())


@needs_sm90
def test_fp8_sparse_kernel_zero_weight():
    """A zero weight (c_proj at init) gives finite results."""
    kern = Fp8SparseKernel(5120, 1280, DEV)
    kern.pack(torch.zeros(5120, 1280, device=DEV, dtype=torch.bfloat16))
    y = kern.linear(torch.randn(64, 1280, device=DEV, dtype=torch.bfloat16), torch.zeros(5120, 1280, device=DEV))
    assert torch.isfinite(y).all() and (y == 0).all()


@needs_sm90
def test_repack_keeps_buffers_and_does_not_recompile():
    torch.manual_seed(2)
    torch._dynamo.reset()
    kern = Fp8SparseKernel(3072, 768, DEV)
    kern.pack(masked_weight(3072, 768, 768 ** -0.5))
    ptrs = [t.data_ptr() for t in kern.packed_buffers()]
    assert len(ptrs) == 6
    fn = torch.compile(kern.linear, fullgraph=True)
    weight = nn.Parameter(torch.zeros(3072, 768, device=DEV))
    fn(torch.randn(256, 768, device=DEV, dtype=torch.bfloat16, requires_grad=True), weight).sum().backward()
    wm2 = masked_weight(3072, 768, 768 ** -0.5)
    kern.pack(wm2)
    assert ptrs == [t.data_ptr() for t in kern.packed_buffers()]
    with torch.compiler.set_stance("fail_on_recompile"):
        check_kernel(kern, wm2, (256,), fn, tol_gx=TOL_E5M2, tol_gw=TOL_E5M2, tag="repacked")  # tensorwise
    # the same with the forward dense: its e4m3 weight and scale are rewritten in place too
    torch._dynamo.reset()
    kern = Fp8SparseKernel(3072, 768, DEV, SparseRuntime(DEV))
    kern.configure(None, SparseOp(LibraryFp8Packer()))
    kern.pack(masked_weight(3072, 768, 768 ** -0.5))
    ptrs = [t.data_ptr() for t in kern.packed_buffers()]
    assert len(ptrs) == 5
    fn = torch.compile(kern.linear, fullgraph=True)
    fn(torch.randn(256, 768, device=DEV, dtype=torch.bfloat16, requires_grad=True), weight).sum().backward()
    kern.pack(wm2)
    assert ptrs == [t.data_ptr() for t in kern.packed_buffers()]
    with torch.compiler.set_stance("fail_on_recompile"):
        check_kernel(kern, wm2, (256,), fn, tol_gx=TOL_E5M2, tol_gw=TOL_E5M2, tag="repacked dense-fwd")


# -----------------------------------------------------------------------------
# Training a few steps, compiled, fp32 master weights + bf16 autocast (as the trainer does)

class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.Module()
        self.attn.c_q = nn.Linear(d, d, bias=False)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        x = x + self.attn.c_q(F.rms_norm(x, (x.size(-1),)))
        h = self.mlp.c_fc(F.rms_norm(x, (x.size(-1),)))
        return x + self.mlp.c_proj(F.relu(h).square())


class TinyLM(nn.Module):
    def __init__(self, vocab=512, d=256, n_layer=2):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, d)
        self.transformer.h = nn.ModuleList([Block(d) for _ in range(n_layer)])
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.transformer.wte(idx)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(F.rms_norm(x, (x.size(-1),))).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def train_steps(model, refresh=lambda: None, steps=25, ddp=False):
    torch.manual_seed(0)
    torch._dynamo.reset()
    idx = torch.randint(0, 512, (8, 128), device=DEV)
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cmodel = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        cmodel = DDP(cmodel, device_ids=[DEV.index or 0])
    losses = []
    for _ in range(steps):
        refresh()  # once per optimizer step, outside compile
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cmodel(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print(f"\nLOSSES {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    return losses


@pytest.mark.parametrize("ddp", [False, True], ids=["single", "ddp1"])
def test_convert_to_float8_trains_compiled(ddp):
    torch.manual_seed(0)
    model = TinyLM().to(DEV)
    lines = []
    names = convert_to_float8(model, DEV, log=lines.append)
    assert len(names) == 6 and "lm_head" not in names, names
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Float8Linear"
    assert type(model.lm_head) is nn.Linear
    if ddp:
        import torch.distributed as dist
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            train_steps(model, ddp=True)
        finally:
            dist.destroy_process_group()
    else:
        train_steps(model)


def test_convert_to_float8_converts_only_the_chosen_shapes():
    """With a token count, shapes whose timing says bf16 stay nn.Linear; the mixed model trains compiled."""
    torch.manual_seed(0)
    model = TinyLM().to(DEV)
    lines = []

    def time_fn(out_features, in_features, tokens, device):
        assert tokens == 1024
        return dict(bf16_ms=1.0, fp8_ms=2.0 if out_features == in_features else 0.5)  # square (attention) loses

    names = convert_to_float8(model, DEV, log=lines.append, tokens=1024, time_fn=time_fn)
    print("\n".join(lines))
    assert sorted(names) == [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")], names
    assert type(model.transformer.h[0].attn.c_q) is nn.Linear
    assert sum("stay bf16" in l for l in lines) == 1 and sum(" in fp8:" in l for l in lines) == 2, lines
    train_steps(model)


def test_fp8_layer_timing_picks_fp8_for_d20_mlp_layers():
    """At d20's MLP shape with 32k tokens per micro-batch fp8 trains faster (benchmarks/results/mlp_fp8_bench*.md:
    1.33x for the whole MLP on H200); the per-layer timing must see that, or --fp8 would leave them bf16."""
    from nanochat.accel.fp8 import time_linear_ms
    for N, K in ((5120, 1280), (1280, 5120)):
        t = time_linear_ms(N, K, 32768, DEV)
        print(f"\n{N}x{K} T=32768: fp8 {t['fp8_ms']:.3f} ms, bf16 {t['bf16_ms']:.3f} ms")
        assert 0 < t["fp8_ms"] < 0.95 * t["bf16_ms"], t


@needs_sm90
def test_fp8_plus_sparse_trains_compiled():
    """--fp8 --sparse shape: MLPs through Fp8SparseKernel, the rest through torchao float8."""
    torch.manual_seed(0)
    model = TinyLM().to(DEV)
    # one converter: sparse first (the fp8 2:4 kernel on the MLP layers), then torchao float8 on the rest (all of
    # them: fp8_layers "all", no timing)
    lines = []
    converter = LinearConverter(DEV, sparse=True, fp8=True, backend="cusparselt", tokens=8 * 128, fp8_layers="all",
                                log=lines.append)
    converter.convert(model)
    print("\n".join(lines))
    assert converter.num_sparse_layers() == 4
    assert sum(l.startswith("fp8 2:4 kernels for 2 layers of weight") for l in lines) == 2, lines  # c_fc, c_proj
    assert all(type(model.get_submodule(f"transformer.h.{i}.mlp.{n}").kernel).__name__ == "Fp8SparseKernel"
               for i in range(2) for n in ("c_fc", "c_proj"))
    fp8_dense = sorted(n for n, p in converter.plan.items() if p == LayerPlan("dense", "fp8"))
    assert fp8_dense == ["transformer.h.0.attn.c_q", "transformer.h.1.attn.c_q"], fp8_dense
    assert converter.meta()["fp8_layers"] == 6 and converter.meta()["sparse_layers"] == 4
    train_steps(model, refresh=lambda: converter.sync(model))
