"""CPU tests of nanochat/accel/kernel_choice.py: the one rule, its margins and the one timing cache that the 2:4 op
choice (bf16 and fp8) and the fp8 layer choice share."""

import json

import torch

from nanochat.accel.fp8 import choose_fp8_shapes
from nanochat.accel.kernel_choice import CACHE_VERSION, MARGINS, TimingCache, pays
from tests.test_fp8 import tiny_model


def test_pays_weighs_the_saving_over_micro_batches_against_the_per_step_cost():
    # 2:4 timed 1.05x faster alone saves 0.58 - 0.552 = 0.028 ms a call: not enough for a 0.05 ms pack at one
    # micro-batch, enough at four
    assert MARGINS["2:4"] == 1.0  # whether 2:4 runs at all is the whole-step gate's (step_gate.py)
    assert pays(0.58, 0.552, MARGINS["2:4"])
    assert not pays(0.58, 0.552, MARGINS["2:4"], micro_batches=1, prep_ms=0.05)
    assert pays(0.58, 0.552, MARGINS["2:4"], micro_batches=4, prep_ms=0.05)
    assert not pays(0.180, 0.214, MARGINS["2:4"], micro_batches=64)  # slower alone never pays
    # fp8 is kept unless it timed more than 10% slower than bf16
    assert pays(1.5, 1.6, MARGINS["fp8"]) and not pays(1.5, 1.7, MARGINS["fp8"])
    assert not pays(1.0, 1.0, 1.0)  # a tie keeps the base kernel


def test_every_choice_defaults_to_the_shared_margins():
    """The bf16 and fp8 2:4 choices and the fp8 layer choice all read MARGINS: one number per kind of choice."""
    import inspect

    import nanochat.accel.sparse.convert as convert
    for tune in (convert._tune, convert._tune_fp8):
        assert 'margin=MARGINS["2:4"]' in inspect.getsource(tune)
    assert inspect.signature(choose_fp8_shapes).parameters["margin"].default == MARGINS["fp8"]


def test_timing_cache_round_trip_nested_entries_and_bad_files(tmp_path):
    path = str(tmp_path / "timings.json")
    key = TimingCache.key("cusparselt", "NVIDIA H200", "torch 2.11.0", "cusparselt 800", "nvmath", "5120x1280", "T32768", "fwd")
    assert key == "cusparselt|NVIDIA H200|torch 2.11.0|cusparselt 800|nvmath|5120x1280|T32768|fwd"
    cache = TimingCache(path)
    assert cache.get(key) is None
    entry = dict(alg=17, sparse_ms=0.42, dense_ms=0.59, num_algs=21)
    nested = {"fwd": dict(sparse_ms=0.44, dense_ms=0.52, pack_ms=0.10, cast_ms=0.06), "dgrad": dict(sparse_ms=0.4, dense_ms=0.5,
                                                                                                   pack_ms=0.16, cast_ms=0.06)}
    cache.put(key, entry)
    cache.put("fp8 2:4|x", nested)
    cache.save()
    again = TimingCache(path)
    assert again.get(key) == entry and again.get("fp8 2:4|x") == nested
    assert again.get(key.replace("NVIDIA H200", "NVIDIA H100 80GB HBM3")) is None  # another GPU: timed again
    for bad in ("{not json", json.dumps({"version": CACHE_VERSION - 1, "entries": {key: entry}}), "[1, 2]"):
        with open(path, "w") as f:
            f.write(bad)
        logs = []
        cache = TimingCache(path, log=logs.append)
        assert cache.entries == {} and len(logs) == 1 and logs[0].startswith("Warning: ignoring the kernel timing cache")
    malformed = {"a": {"alg": "17"}, "b": {"ms": -1.0}, "c": {"ms": float("nan")}, "d": {}, "e": {"x": {"y": {"z": 1}}},
                 "f": {"ok": True}, "g": 3}
    with open(path, "w") as f:  # malformed entries are dropped, good ones kept
        json.dump({"version": CACHE_VERSION, "entries": {key: entry, **malformed}}, f)
    assert TimingCache(path).entries == {key: entry}


def test_timing_cache_measures_once_and_survives_an_unwritable_path(tmp_path):
    calls = []
    cache = TimingCache(str(tmp_path / "t.json"))

    def measure():
        calls.append(1)
        return dict(ms=1.0)
    assert cache.measured("k", measure) == dict(ms=1.0) and cache.measured("k", measure) == dict(ms=1.0)
    assert len(calls) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    logs = []
    unwritable = TimingCache(str(blocker / "sub" / "t.json"), log=logs.append)  # a file where a directory should be
    unwritable.put("k", dict(ms=1.0))
    unwritable.save()
    assert len(logs) == 1 and logs[0].startswith("Warning: could not write the kernel timing cache")


def test_fp8_layer_choice_reads_its_timings_from_the_cache(tmp_path):
    calls = []

    def time_fn(out_features, in_features, tokens, device):
        calls.append((out_features, in_features))
        return dict(bf16_ms=1.5, fp8_ms=1.6 if out_features > in_features else 2.0)
    path = str(tmp_path / "t.json")
    first = choose_fp8_shapes(tiny_model(), 4096, torch.device("cpu"), log=print, time_fn=time_fn, cache=TimingCache(path))
    assert first == {(64, 64): False, (256, 64): True} and len(calls) == 2
    lines = []
    second = choose_fp8_shapes(tiny_model(), 4096, torch.device("cpu"), log=lines.append, time_fn=time_fn,
                               cache=TimingCache(path))
    assert second == first and len(calls) == 2  # nothing timed again
    assert "timed or read from the timing cache" in lines[-1]
    choose_fp8_shapes(tiny_model(), 8192, torch.device("cpu"), log=print, time_fn=time_fn, cache=TimingCache(path))
    assert len(calls) == 4  # another token count is another key


def test_timing_cache_writes_only_what_a_run_added(tmp_path):
    path = tmp_path / "t.json"
    TimingCache(str(path)).save()
    assert not path.exists()  # nothing measured: nothing written
    cache = TimingCache(str(path))
    cache.put("k", dict(ms=1.0))
    cache.save()
    before = path.stat().st_mtime_ns
    path.write_text(path.read_text())  # same bytes, newer time stamp
    touched = path.stat().st_mtime_ns
    reread = TimingCache(str(path))
    assert reread.measured("k", lambda: dict(ms=2.0)) == dict(ms=1.0)
    reread.save()
    assert path.stat().st_mtime_ns == touched and touched >= before


class FakeLibrary:
    """Stands in for a cuSPARSELt library object on CPU: what the tuner asks of it."""
    name, version, device, handle = "fake", 800, torch.device("cpu"), 1

    def empty_compressed(self, m, k):
        return torch.empty(m * k * 9 // 8, dtype=torch.uint8)

    def prepare(self, *args):
        pass


class FakeRuntime:
    device = torch.device("cpu")

    def __init__(self):
        self.lib = FakeLibrary()

    def library(self, impl):
        return self.lib

    def compressor(self, impl, m, k, kind="auto", log=None):
        def compress(wm, out):
            return out
        compress.name = "fake"
        return compress


def fake_tuning(monkeypatch, dense_ms):
    """GEMM timings where 2:4 takes 0.18 ms and dense `dense_ms`; compression 0.02 ms. Returns the calls list."""
    import nanochat.accel.sparse.convert as convert
    import nanochat.accel.sparse.tune as tune
    calls = []

    def time_gemm(lib, m, k, T, op, device):
        calls.append((m, k, T, op))
        return dict(alg=17, sparse_ms=0.18, dense_ms=dense_ms, num_algs=20)
    monkeypatch.setattr(tune, "time_gemm", time_gemm)
    monkeypatch.setattr(tune, "time_compress_ms", lambda *a: 0.02)
    monkeypatch.setattr(convert, "_kernel_kind", lambda config, device: "cusparselt")
    monkeypatch.setattr(convert, "sparse_step_pays", lambda *a: (True, "2:4 GEMMs on: a fake whole-step record"))
    monkeypatch.setattr(convert, "pick_impl", lambda requested: ("nvmath", "fake"))
    monkeypatch.setattr(convert, "_make_kernel", lambda kind, impl, n, k, runtime, log:
                        convert.CusparseltKernel(runtime.library(impl)) if kind == "cusparselt" else convert.MaskedKernel())
    return calls


def tiny_gpt():
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model


def test_sparse_tuning_goes_through_the_shared_rule_and_cache(monkeypatch, tmp_path):
    """The conversion times each (shape, op) once, keeps the timings in the run's cache, and chooses by
    kernel_choice's rule: 0.30 ms dense against 0.18 ms 2:4 pays, 0.214 against 0.18 (1.19x) does not."""
    from nanochat.accel.sparse import SparseConfig, convert_mlp_to_sparse
    from nanochat.accel.sparse.convert import sparse_layers
    calls = fake_tuning(monkeypatch, dense_ms=0.30)
    path = str(tmp_path / "t.json")
    lines = []
    model = tiny_gpt()
    config = SparseConfig(tokens=256, micro_batches=4, timing_cache=TimingCache(path), log=lines.append)
    assert convert_mlp_to_sparse(model, "cpu", config, runtime=FakeRuntime()) == 4
    assert len(calls) == 4  # 2 shapes x 2 ops
    assert all(m.kernel.describe() == "fwd cuSPARSELt alg 17, dgrad cuSPARSELt alg 17" for m in sparse_layers(model))
    assert not any(line.startswith("2:4: no op pays") for line in lines)
    keys = list(TimingCache(path).entries)
    assert len(keys) == 4 and all(k.startswith("cusparselt|cpu|torch ") and "|T256|" in k for k in keys)
    # a second run reads them back instead of timing
    convert_mlp_to_sparse(tiny_gpt(), "cpu", SparseConfig(tokens=256, micro_batches=4, timing_cache=TimingCache(path),
                                                         log=print), runtime=FakeRuntime())
    assert len(calls) == 4


def test_sparse_conversion_says_so_when_no_op_pays(monkeypatch, tmp_path):
    from nanochat.accel.sparse import SparseConfig, convert_mlp_to_sparse
    from nanochat.accel.sparse.convert import sparse_layers
    fake_tuning(monkeypatch, dense_ms=0.184)  # saves 4 x 0.004 ms a step, less than the 0.02 ms pack
    lines = []
    model = tiny_gpt()
    convert_mlp_to_sparse(model, "cpu", SparseConfig(tokens=256, micro_batches=4, timing_cache=TimingCache(str(tmp_path / "t.json")),
                                                     log=lines.append), runtime=FakeRuntime())
    assert all(m.kernel.name == "masked" for m in sparse_layers(model))  # no library, plans or compressors kept
    assert sum(line.startswith("2:4: no op pays at this size") for line in lines) == 1
    # the model still computes with the pruned weights: every layer holds its masked copy
    assert all(m.kernel.wm is not None and (m.kernel.wm == 0).float().mean() >= 0.5 for m in sparse_layers(model))
