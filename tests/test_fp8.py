"""CPU tests of nanochat/accel/fp8.py and nanochat/accel/hardware.py's fp8 checks: support checks, the fallback
warning, the layer filter. They do not need torchao or a GPU."""

import pytest
import torch
import torch.nn as nn

from nanochat.accel.fp8 import choose_fp8_shapes, convert_to_float8, fp8_module_filter
from nanochat.accel.hardware import fp8_sparse_supported, fp8_supported
from nanochat.accel.sparse import SemiSparseLinear


class SparseSubclass(SemiSparseLinear):
    pass


def tiny_model():
    d = 64
    block = nn.Module()
    block.attn = nn.Module()
    block.attn.c_q = nn.Linear(d, d, bias=False)
    block.mlp = nn.Module()
    block.mlp.c_fc = nn.Linear(d, 4 * d, bias=False)
    block.mlp.c_proj = SemiSparseLinear(4 * d, d, bias=False)
    block.mlp.c_odd = nn.Linear(d, 40 + 2, bias=False)  # 42: not a multiple of 16
    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.h = nn.ModuleList([block])
    model.lm_head = nn.Linear(d, 100, bias=False)
    return model


def test_fp8_supported_false_on_cpu():
    ok, reason = fp8_supported("cpu")
    assert ok is False and "cpu" in reason
    ok, reason = fp8_sparse_supported(torch.device("cpu"))
    assert ok is False and reason


def test_convert_on_cpu_warns_and_leaves_model():
    model = tiny_model()
    before = [(n, type(m)) for n, m in model.named_modules()]
    lines = []
    assert convert_to_float8(model, torch.device("cpu"), log=lines.append) == []
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert len(lines) == 1
    assert lines[0].startswith("Warning: --fp8 requires a CUDA GPU with compute capability >= 8.9")
    assert lines[0].endswith("training in bf16")


def test_convert_on_cpu_with_tokens_times_nothing():
    def time_fn(*_):
        raise AssertionError("no timing where fp8 is unsupported")
    lines = []
    assert convert_to_float8(tiny_model(), torch.device("cpu"), log=lines.append, tokens=4096, time_fn=time_fn) == []
    assert len(lines) == 1 and lines[0].startswith("Warning: --fp8 requires")


def test_choose_fp8_shapes_keeps_slower_shapes_bf16_and_logs_each():
    model = tiny_model()
    model.transformer.h.append(tiny_model().transformer.h[0])  # two blocks: shapes are timed once each
    calls = []

    def time_fn(out_features, in_features, tokens, device):
        calls.append((out_features, in_features, tokens))
        fp8_ms = 1.6 if out_features > in_features else 2.0  # c_fc (256x64) within the margin, c_q (64x64) not
        return dict(bf16_ms=1.5, fp8_ms=fp8_ms)

    lines = []
    choice = choose_fp8_shapes(model, 4096, torch.device("cpu"), log=lines.append, time_fn=time_fn)
    assert choice == {(64, 64): False, (256, 64): True}
    assert sorted(calls) == [(64, 64, 4096), (256, 64, 4096)]
    assert lines[-1].startswith("fp8: 2 layer shapes timed in ") and lines[-1].endswith("s (--fp8-layers all skips this)")
    assert lines[:-1] == [
        "fp8: 2 layers of weight 64x64 (c_q) stay bf16: forward + backward 2.000 ms in fp8, 1.500 ms in bf16 at T=4096",
        "fp8: 2 layers of weight 256x64 (c_fc) in fp8: forward + backward 1.600 ms in fp8, 1.500 ms in bf16 at T=4096"]
    strict = choose_fp8_shapes(model, 4096, torch.device("cpu"), log=print, time_fn=time_fn, margin=1.0)
    assert strict == {(64, 64): False, (256, 64): False}


def test_module_filter_picks_the_right_layers():
    model = tiny_model()
    skipped = []
    picked = [n for n, m in model.named_modules() if fp8_module_filter(m, n, skipped)]
    assert picked == ["transformer.h.0.attn.c_q", "transformer.h.0.mlp.c_fc"]
    assert skipped == ["transformer.h.0.mlp.c_odd (42x64)"]
    # SemiSparseLinear subclasses, lm_head anywhere, and non-Linear modules are never picked
    assert not fp8_module_filter(SparseSubclass(64, 64), "transformer.h.1.mlp.c_fc")
    assert not fp8_module_filter(nn.Linear(64, 64), "model.lm_head")
    assert not fp8_module_filter(nn.Embedding(10, 64), "transformer.wte")


def test_bf16_linears_bypasses_float8_forward_for_sampling():
    """Sampling runs Float8Linear layers as plain nn.Linear, and restores them afterwards."""
    from nanochat.accel.fp8 import bf16_linears

    class Float8Linear(nn.Linear):  # stands in for torchao's class (matched by name)
        def forward(self, x):
            raise RuntimeError("fp8 path used")

    torch.manual_seed(0)
    model = nn.Sequential(Float8Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 16)
    with bf16_linears(model) as n:
        y = model(x)
    assert n == 1
    ref = model[2](torch.relu(x @ model[0].weight.t() + model[0].bias))
    torch.testing.assert_close(y, ref)
    with pytest.raises(RuntimeError, match="fp8 path used"):
        model(x)
