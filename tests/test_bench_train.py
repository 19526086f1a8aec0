"""benchmarks/bench_train.py: the steady numbers of a trainer run's step events (the ones the trainer's own
summary reports), the interleaved schedule and its statistics, and the child processes that train."""

import pytest

from benchmarks.bench_train import steady_from_events
from nanochat.flags import build_arg_parser
from nanochat.metrics import read_events
from nanochat.train import train
from tests.test_train import TINY


def test_steady_from_events_matches_the_trainer_summary(tiny_data_dir, tiny_tokenizer, tmp_path):
    events = str(tmp_path / "events.jsonl")
    out = train(build_arg_parser().parse_args(TINY + ["--num-iterations", "13", "--model-tag", "benchlog",
                                                      "--events", events]))
    parsed = steady_from_events(read_events(events, "step"))
    s = out["summary"]
    assert parsed["steps_logged"] == 13
    assert parsed["tok_per_sec_mean"] == pytest.approx(s["tok_per_sec"], rel=1e-9)
    steady = sorted(out["history"]["tok_per_sec"][10:])
    assert parsed["tok_per_sec"] == pytest.approx(steady[1], rel=1e-9)  # the median of the 3 steady steps
    assert parsed["mfu"] is None  # CPU: no peak FLOPs


def test_steady_from_events_needs_a_step_past_warmup():
    def steps(n):
        return [dict(event="step", step=i, loss=5.0, dt=0.95, tok_per_sec=68000.0, mfu=45.5, peak_memory_gib=43.44)
                for i in range(1, n + 1)]
    assert steady_from_events(steps(10)) is None
    r = steady_from_events(steps(12))
    assert (r["tok_per_sec"], r["step_time_ms"], r["mfu"], r["peak_memory_gib"]) == (68000, 950, 45.5, 43.44)


def test_schedule_soaks_then_reverses_every_other_round():
    from benchmarks.bench_train import schedule
    plan = schedule(["dense", "sparse"], rounds=3, soak_seconds=20, soak_block_seconds=8)
    assert [(m, k) for m, _, k in plan] == [("dense", "soak"), ("sparse", "soak"), ("dense", "soak"),
                                           ("dense", "round0"), ("sparse", "round0"), ("sparse", "round1"),
                                           ("dense", "round1"), ("dense", "round2"), ("sparse", "round2")]


def test_rows_from_a_fake_step_recover_the_step_ratio():
    """A fake clock: dense steps take 10 units, sparse 8 (1.25x); the first step of each block is slow (a switch)."""
    from benchmarks.bench_train import block_rows, mode_summary, run_schedule, schedule
    now = [0.0]
    last = [None]

    def clock():
        return now[0]

    def step(mode):
        now[0] += (10.0 if mode == "dense" else 8.0) * (3 if last[0] != mode else 1)
        last[0] = mode

    plan = schedule(["dense", "sparse"], rounds=4, soak_seconds=0, soak_block_seconds=1)
    steps = run_schedule(plan, step, block_seconds=100, clock=clock)
    assert {s["block"] for s in steps} == set(range(8)) and all(s["t1"] > s["t0"] for s in steps)
    blocks = block_rows(steps, samples=[], drop_steps=1)
    assert all(b["sm_mhz"] is None and b["joules_per_step"] is None for b in blocks)  # no GPU samples: no numbers
    summary = mode_summary(blocks, ["dense", "sparse"], tokens_per_step=1000)
    assert summary["dense"]["step_ms"] == pytest.approx(10_000)
    assert summary["sparse"]["ratio"] == pytest.approx(1.25)
    assert summary["sparse"]["ratio_min"] == summary["sparse"]["ratio_max"] == pytest.approx(1.25)
    assert summary["sparse"]["tok_per_sec"] == pytest.approx(1000 / 8.0)


def test_children_share_one_log_and_a_failure_names_its_end(tmp_path):
    """Every child's output goes to one log (a GPU machine hands back few files); a failing child raises with
    the end of its own output."""
    from benchmarks.bench_train import run_child
    log = tmp_path / "bench_children.log"
    for flag in ("--no-such-flag", "--another-bad-flag"):
        spec = dict(modes=["dense"], flags={"dense": ["--depth", "2", flag]}, warm_steps=1, block_seconds=1,
                    plan=[["dense", None, "round0"]])
        with pytest.raises(RuntimeError, match=f"(?s)exit code 2: .*{flag}"):
            run_child(spec, str(log), timeout=120)
    text = log.read_text()
    assert text.count("===== dense: --depth 2") == 2 and "--no-such-flag" in text and "--another-bad-flag" in text
    assert list(tmp_path.iterdir()) == [log]


def test_a_child_trains_and_its_result_says_which_kernels_ran(tiny_data_dir, tiny_tokenizer, tmp_path):
    from benchmarks.bench_train import run_child
    flags = TINY + ["--sparse", "--sparse-backend", "masked", "--num-iterations", "1000", "--save-every", "0",
                    "--model-tag", "bench_child"]
    log = tmp_path / "children.log"
    out = run_child(dict(modes=["sparse"], flags={"sparse": flags}, warm_steps=2, block_seconds=1.0,
                         plan=[["sparse", None, "round0"]]), str(log), timeout=300)
    assert len(out["steps"]) >= 1 and {s["mode"] for s in out["steps"]} == {"sparse"}
    assert out["info"]["sparse"]["kernel_choice"] == []  # the masked kernel on CPU chooses nothing
    assert "converted 4 MLP layers to SemiSparseLinear" in log.read_text()  # set-up lines still reach the log



def test_bisection_variants_freeze_the_pack_or_run_every_op_dense():
    """`MODE+VARIANT` for bisecting a --sparse step: +frozen packs once and never again (eager forward still
    runs on it), +ops_dense leaves every op dense on a fresh masked weight. Checked on the masked kernel."""
    import argparse

    import torch

    from benchmarks.bench_train import VARIANTS, mode_choice
    from nanochat.accel.converters import LinearConverter
    from nanochat.accel.sparse import sparse_layers
    from tests.test_converters import tiny_gpt
    assert mode_choice("sparse_24+frozen") == "sparse_24+frozen"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown mode"):
        mode_choice("sparse+thawed")
    for variant in ("frozen", "ops_dense"):
        model = tiny_gpt()
        converter = LinearConverter("cpu", sparse=True, backend="masked", log=lambda *_: None)
        converter.convert(model)
        VARIANTS[variant](sparse_layers(model))
        packs = [m.num_packs for m in sparse_layers(model)]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.register_step_post_hook(lambda *_: converter.post_optimizer_hook(model))
        idx = torch.randint(0, 256, (2, 16))
        model(idx, idx).backward()
        opt.step()
        model(idx, idx)  # eager forward after the step
        grew = [m.num_packs - p for m, p in zip(sparse_layers(model), packs)]
        assert grew == ([0] * 4 if variant == "frozen" else [1] * 4)
        assert all(m.kernel.describe().startswith("fwd dense, dgrad dense") for m in sparse_layers(model))
