"""CPU tests of the model converters (nanochat/accel/converters.py): their order, checkpoint meta and the
inference path from it; and the import graph they keep acyclic (lazy imports included)."""

import ast
import os
import sys

import pytest
import torch

from nanochat.accel.converters import ORDER, Converters, Fp8Converter, SparseConverter
from nanochat.accel.sparse import SemiSparseLinear
from nanochat.gpt import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model


def test_converters_run_sparse_first_and_record_meta():
    lines = []
    fp8, sparse = Fp8Converter("cpu", log=lines.append), SparseConverter("cpu", backend="masked", log=lines.append)
    converters = Converters([fp8, None, sparse])
    assert [type(c) for c in converters.converters] == list(ORDER) == [SparseConverter, Fp8Converter]
    model = tiny_gpt()
    converters.convert(model)
    assert sparse.num_layers == 4 and fp8.converted == []  # fp8 needs a GPU: one warning, the model stays bf16
    assert lines[0] == "✓ 2:4 sparsity enabled - converted 4 MLP layers to SemiSparseLinear"
    assert lines[-1].startswith("Warning: --fp8 requires a CUDA GPU")
    assert converters.meta() == dict(sparse=True, sparse_backend="masked", sparse_layers=4, fp8=True)
    assert Converters().meta() == dict(sparse=False, fp8=False)


def test_after_optimizers_repacks_once_per_step():
    model = tiny_gpt()
    converters = Converters([SparseConverter("cpu", backend="masked", log=lambda *_: None)])
    converters.convert(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    converters.after_optimizers(model, [opt])
    layers = [m for m in model.modules() if isinstance(m, SemiSparseLinear)]
    idx = torch.randint(0, 256, (2, 16))
    model(idx, idx).backward()
    opt.step()
    assert all(m.num_packs == 2 for m in layers)  # conversion + the step's hook
    converters.after_wrap(model)
    assert all(m.num_packs == 2 for m in layers)  # unchanged weights: nothing to re-pack
    logs = []
    assert converters.check_replicas(model, logs.append) is None and logs == []  # no process group: nothing compared


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
    sparse = SparseConverter("cpu", backend="masked", log=lambda *_: None)
    model = tiny_gpt()
    Converters([sparse]).convert(model)
    module = sys.modules[SparseConverter.__module__]
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
    converters = Converters.from_meta(old, "cpu")
    assert [type(c) for c in converters.converters] == [SparseConverter]  # fp8 checkpoints evaluate in bf16
    assert converters.converters[0].config.backend == "masked"  # off CUDA: the same masks, dense GEMMs
    model = tiny_gpt()
    converters.convert(model)
    assert sum(isinstance(m, SemiSparseLinear) for m in model.modules()) == 4
    assert Converters.from_meta(dict(model_config={}), "cpu").converters == []  # a dense checkpoint


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
    # nanochat.accel.converters (the trainer and Converters.from_meta for inference); the trainer also opens the
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
    with Converters([SparseConverter("cpu"), Fp8Converter("cpu")]).eager(model):
        torch.testing.assert_close(model(x), x @ model[0].weight.t() + model[0].bias)
    with Converters().eager(model), pytest.raises(RuntimeError, match="fp8 path used"):
        model(x)
