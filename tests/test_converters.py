"""CPU tests of the model converter (nanochat/accel/converters.py): its plan, the re-pack hook and sync,
checkpoint meta and the inference path from it; and the import graph they keep acyclic (lazy imports included)."""

import ast
import os
import sys

import pytest
import torch

from nanochat.accel.converters import LayerPlan, LinearConverter
from nanochat.accel.sparse import SemiSparseLinear
from nanochat.gpt import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model


def test_plan_is_sparse_first_and_meta_says_what_converted():
    lines = []
    converter = LinearConverter("cpu", sparse=True, fp8=True, backend="masked", log=lines.append)
    model = tiny_gpt()
    planned = converter.planned(model)
    mlp = [f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")]
    attn = [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_q", "c_k", "c_v", "c_proj")]
    assert planned == {**{n: LayerPlan("2:4", "fp8") for n in mlp}, **{n: LayerPlan("dense", "fp8") for n in attn}}
    converter.convert(model)
    # fp8 needs a GPU: one warning, the model stays bf16; the 2:4 layers run the masked bf16 kernel
    assert converter.num_sparse_layers() == 4 and converter.plan == {n: LayerPlan("2:4", "bf16") for n in mlp}
    assert lines[0] == "✓ 2:4 sparsity enabled - converted 4 MLP layers to SemiSparseLinear"
    assert lines[-1].startswith("Warning: --fp8 requires a CUDA GPU")
    assert converter.meta() == dict(sparse=True, sparse_backend="masked", sparse_layers=4, fp8=True, fp8_layers=0)
    assert LinearConverter("cpu").meta() == dict(sparse=False, fp8=False)


def test_post_optimizer_hook_repacks_once_per_step():
    model = tiny_gpt()
    converter = LinearConverter("cpu", sparse=True, backend="masked", log=lambda *_: None)
    converter.convert(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.register_step_post_hook(lambda *_: converter.post_optimizer_hook(model))  # as the trainer
    layers = [m for m in model.modules() if isinstance(m, SemiSparseLinear)]
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx).backward()
    opt.step()
    assert all(m.num_packs == 2 for m in layers)  # conversion + the step's hook
    assert converter.sync(model) == 0
    assert all(m.num_packs == 2 for m in layers)  # unchanged weights: nothing to re-pack
    logs = []
    assert converter.check_replicas(model, logs.append) is None and logs == []  # no process group: nothing compared
    model.load_state_dict(tiny_gpt().state_dict())  # what a resume does before the trainer's sync
    assert converter.sync(model) == 4 and converter.sync(model) == 0


class TwoRankGroup:
    """Stands in for torch.distributed in a 2-process group whose other rank's mask checksum is this rank's
    plus `offset` (0: the same masks)."""
    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, offset):
        self.offset = offset

    def is_initialized(self):
        return True

    def get_world_size(self):
        return 2

    def all_reduce(self, sums, op):
        assert op == self.ReduceOp.MAX
        local = sums[0].item()
        sums.copy_(torch.maximum(sums, torch.tensor([local + self.offset, -(local + self.offset)], dtype=sums.dtype)))


@pytest.mark.parametrize("offset", [7, -7])
def test_check_replicas_compares_the_ranks_masks(monkeypatch, offset):
    sparse = LinearConverter("cpu", sparse=True, backend="masked", log=lambda *_: None)
    model = tiny_gpt()
    sparse.convert(model)
    module = sys.modules[LinearConverter.__module__]
    logs = []
    monkeypatch.setattr(module, "dist", TwoRankGroup(0))
    sparse.check_replicas(model, logs.append)
    assert logs == ["2:4 masks identical on all 2 ranks"]
    monkeypatch.setattr(module, "dist", TwoRankGroup(offset))  # the other rank kept more or fewer entries
    with pytest.raises(RuntimeError, match="^ranks pruned different 2:4 masks: the replicas' weights have diverged$"):
        sparse.check_replicas(model, logs.append)


def test_from_meta_rebuilds_what_inference_needs():
    # the keys checkpoints have always carried: sparse, sparse_backend, fp8
    old = dict(sparse=True, sparse_backend="auto", fp8=True)
    converter = LinearConverter.from_meta(old, "cpu")
    assert converter.sparse and not converter.fp8  # fp8 checkpoints evaluate in bf16
    assert converter.backend == "masked"  # off CUDA: the same masks, dense GEMMs
    model = tiny_gpt()
    converter.convert(model)
    assert sum(isinstance(m, SemiSparseLinear) for m in model.modules()) == 4
    dense = LinearConverter.from_meta(dict(model_config={}), "cpu")  # a dense checkpoint
    assert not dense.sparse and not dense.fp8
    dense.convert(model := tiny_gpt())
    assert dense.plan == {} and not any(isinstance(m, SemiSparseLinear) for m in model.modules())


def test_inference_load_packs_the_loaded_weights(tmp_path):
    """load_model_for_inference converts, loads, then syncs: the eager model computes with the saved weights."""
    from nanochat.accel.sparse import transposable_mask_reference
    from nanochat.checkpoint import load_model_for_inference, save_checkpoint
    trained = tiny_gpt()
    converter = LinearConverter("cpu", sparse=True, backend="masked", log=lambda *_: None)
    converter.convert(trained)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    converter.sync(trained)
    meta = dict(model_config=trained.config.to_dict(), **converter.meta())
    save_checkpoint(str(tmp_path), 1, trained.state_dict(), None, None, meta)
    model, _ = load_model_for_inference(str(tmp_path), 1, "cpu")
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), trained(idx), rtol=0, atol=0)
    layer = model.transformer.h[0].mlp.c_fc
    torch.testing.assert_close(layer.kernel.wm, layer.weight * transposable_mask_reference(layer.weight))


def module_imports(path, name):
    """Every nanochat/scripts/benchmarks module a file imports, at the top or inside functions."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    package = name.rpartition(".")[0]
    return {m for m in found if m.split(".")[0] in ("nanochat", "scripts", "benchmarks") and m != package}


def import_graph():
    graph = {}
    for top in ("nanochat", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                    graph[rel.removesuffix(".__init__")] = module_imports(os.path.join(dirpath, f), rel)
    # importing a.b.c runs a.b's __init__ first, except from inside a.b (already running)
    def with_packages(m, deps):
        own = {m.rsplit(".", i)[0] for i in range(1, m.count(".") + 1)}
        out = set()
        for d in deps:
            out |= {d.rsplit(".", i)[0] for i in range(d.count(".") + 1)}
        return {d for d in out if d in graph and d not in own and d != m}
    return {m: with_packages(m, deps) for m, deps in graph.items()}


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_import_graph_has_no_cycles_and_respects_layers():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert cycles == []
    for m in graph:
        if m.startswith("nanochat"):
            assert not any(d.startswith(("scripts", "benchmarks")) for d in reachable(graph, m)), m
    assert not any(d.startswith("nanochat.accel.sparse") for d in reachable(graph, "nanochat.accel.fp8"))
    assert "nanochat.accel.fp8" not in reachable(graph, "nanochat.accel.sparse")
    for inference in ("scripts.base_eval", "scripts.base_sample", "scripts.export_sparse",
                      "nanochat.accel.sparse_export", "nanochat.checkpoint"):
        assert "nanochat.train" not in reachable(graph, inference), inference
    # the wing: the model, loss, optimizer and data never reach it; the rest of nanochat enters it only through
    # nanochat.accel.converters (the trainer and LinearConverter.from_meta for inference); the trainer also opens the
    # timing cache of kernel_choice
    for core in ("nanochat.gpt", "nanochat.loss", "nanochat.optim", "nanochat.dataloader", "nanochat.dataset"):
        assert not any(d.startswith("nanochat.accel") for d in reachable(graph, core)), core
    entries = {"nanochat.accel", "nanochat.accel.converters"}
    for m, deps in graph.items():
        if m.startswith("nanochat.") and not m.startswith("nanochat.accel"):
            allowed = entries | ({"nanochat.accel.kernel_choice"} if m == "nanochat.train" else set())
            assert {d for d in deps if d.startswith("nanochat.accel")} <= allowed, m
    assert "nanochat.accel.converters" in graph["nanochat.train"]


def test_eager_runs_float8_layers_as_bf16_linears():
    class Float8Linear(torch.nn.Linear):  # stands in for torchao's class (matched by name)
        def forward(self, x):
            raise RuntimeError("fp8 path used")

    model = torch.nn.Sequential(Float8Linear(16, 8))
    x = torch.randn(3, 16)
    with LinearConverter("cpu", sparse=True, fp8=True).eager(model):
        torch.testing.assert_close(model(x), x @ model[0].weight.t() + model[0].bias)
    with LinearConverter("cpu").eager(model), pytest.raises(RuntimeError, match="fp8 path used"):
        model(x)
