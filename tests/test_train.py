"""The training loop end to end on CPU: loss falls, checkpoints resume exactly, bad input fails cleanly,
and 2 processes under torchrun (gloo) compute what one process computes on the same global batch."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint
from nanochat.common import UserError
from nanochat.flags import build_arg_parser
from nanochat.train import train

TINY = ["--device-type", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32",
        "--device-batch-size", "4", "--total-batch-size", "256", "--warmup-steps", "2", "--eval-tokens", "256",
        "--sample-every", "-1", "--eval-every", "-1"]


def run(*extra):
    return train(build_arg_parser().parse_args(TINY + list(extra)))


@pytest.fixture
def data(tiny_data_dir, tiny_tokenizer):
    return tiny_data_dir


def test_tiny_run_loss_falls_and_writes_everything(data, nanochat_base_dir):
    out = run("--num-iterations", "30", "--model-tag", "falls", "--matrix-lr", "0.04")
    losses = out["history"]["loss"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    s = out["summary"]
    assert s["val_bpb"] is not None and 0 < s["val_bpb"] < 20
    assert len(s["samples"]) == 3
    ckpt = os.path.join(nanochat_base_dir, "base_checkpoints", "falls")
    assert sorted(os.listdir(ckpt)) == ["events.jsonl", "meta_000030.json", "model_000030.pt", "optim_000030_rank0.pt"]
    report = os.path.join(nanochat_base_dir, "report")
    assert os.path.exists(os.path.join(report, "falls.md")) and os.path.exists(os.path.join(report, "falls_loss.png"))


def test_resume_continues_exactly(data):
    full = run("--num-iterations", "8", "--save-every", "4", "--model-tag", "resume")
    resumed = run("--num-iterations", "8", "--model-tag", "resume", "--resume-from-step", "4")
    assert resumed["history"]["step"] == [5, 6, 7, 8]
    assert resumed["history"]["loss"] == full["history"]["loss"][4:]  # bit-exact on CPU
    assert resumed["summary"]["val_bpb"] == full["summary"]["val_bpb"]


def test_eval_and_sample_every_zero_skip_them(data):
    # benchmarks time training alone: no final eval (a recompile in eval mode) and no sampling
    out = run("--num-iterations", "3", "--model-tag", "noeval", "--eval-every", "0", "--sample-every", "0")
    assert out["summary"]["val_bpb"] is None and out["history"]["val_step"] == []
    assert out["summary"]["samples"] == []
    assert len(out["history"]["loss"]) == 3


def test_checkpoint_from_another_config_is_refused(data, nanochat_base_dir):
    run("--num-iterations", "2", "--model-tag", "cfg")
    ckpt = os.path.join(nanochat_base_dir, "base_checkpoints", "cfg")
    before = {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)}
    args = build_arg_parser().parse_args(TINY + ["--num-iterations", "4", "--model-tag", "cfg", "--resume-from-step", "2"])
    args.depth = 3
    with pytest.raises(UserError, match="another model config: n_layer=2"):
        train(args)
    assert {f: os.path.getmtime(os.path.join(ckpt, f)) for f in os.listdir(ckpt)} == before


@pytest.mark.parametrize("flags, message", [
    (["--depth", "0"], "--depth must be >= 1"),
    (["--total-batch-size", "100"], "is not a multiple of device batch x seq len"),
    (["--device-type", "tpu"], "unknown --device-type"),
    (["--resume-from-step", "7", "--model-tag", "nothing_here"], "no checkpoint at step 7"),
    (["--num-iterations", "0"], "--num-iterations must be >= 1, or -1 for the horizon from "
                                "--target-flops/--target-param-data-ratio (got 0)"),
    (["--resume-from-step", "-5"], "--resume-from-step must be a saved step, or -1 for a fresh run (got -5)"),
    (["--eval-tokens", "0"], "--eval-tokens must be >= 1 (got 0); to turn evaluation off use --eval-every 0"),
    (["--keep-last-k", "-1"], "--keep-last-k must be >= 0, 0 keeps every checkpoint (got -1)"),
    (["--save-every", "-2"], "--save-every must be N >= 1, -1 (only at the end) or 0 (never) (got -2)"),
    (["--overwrite", "--resume-from-step", "2"], "--overwrite is for a fresh run replacing a tag's checkpoints; "
                                                 "drop it to resume"),
])
def test_bad_input_is_one_clear_error(data, flags, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run("--num-iterations", "2", *flags)


def test_cpu_eval_has_a_bounded_default_and_shows_progress(data, capsys, monkeypatch):
    """Without --eval-tokens a CPU run evaluates CPU_EVAL_TOKENS (the GPU default would take minutes), with progress."""
    import nanochat.train
    monkeypatch.setattr(nanochat.train, "CPU_EVAL_TOKENS", 10 * 4 * 32)  # 10 of TINY's micro-batches
    i = TINY.index("--eval-tokens")
    train(build_arg_parser().parse_args(TINY[:i] + TINY[i + 2:] + ["--num-iterations", "1", "--save-every", "0",
                                                                   "--sample-every", "0", "--model-tag", "cpu_eval"]))
    assert re.findall(r"^val bpb: batch (\d+)/10 \(", capsys.readouterr().out, re.M) == [str(k) for k in range(1, 10)]


def test_eval_tokens_zero_is_fine_with_eval_off(data):
    out = run("--num-iterations", "1", "--model-tag", "evaloff", "--eval-tokens", "0", "--eval-every", "0")
    assert out["history"]["val_step"] == [] and len(out["history"]["loss"]) == 1


def test_default_model_on_cpu_is_refused_unless_depth_is_given(data):
    args = build_arg_parser().parse_args(["--device-type", "cpu", "--num-iterations", "1"])
    with pytest.raises(UserError, match=r"^the default model \(depth 20, \d+M parameters\) is far too large to train on "
                                        r"CPU: use `make train`'s settings \(--depth 4 .*\), --device-type cuda on a GPU, "
                                        r"or pass --depth 20 to run it anyway$"):
        train(args)


@pytest.mark.parametrize("save_every, message", [
    # step 2's update is NaN: its weights are not saved, step 1 stays the newest checkpoint
    ("1", "training diverged at step 2 (the weights are not finite) and nothing of that step was saved; "
          "the newest checkpoint is step 1 (--resume-from-step 1); lower the learning rates"),
    # no save before step 3, whose loss comes out NaN
    ("-1", "training diverged at step 3 (the loss is nan) and nothing of that step was saved; "
           "no checkpoint was saved; lower the learning rates"),
])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(data, nanochat_base_dir, monkeypatch, save_every, message):
    import nanochat.train
    real = nanochat.train.lr_multiplier
    monkeypatch.setattr(nanochat.train, "lr_multiplier", lambda step, *a: float("nan") if step == 1 else real(step, *a))
    tag = f"nan{save_every}"
    with pytest.raises(UserError, match=re.escape(message)):
        run("--num-iterations", "4", "--save-every", save_every, "--model-tag", tag)
    ckpt = os.path.join(nanochat_base_dir, "base_checkpoints", tag)
    if save_every == "1":
        assert sorted(os.listdir(ckpt)) == ["events.jsonl", "meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
        state = torch.load(os.path.join(ckpt, "model_000001.pt"), weights_only=True)
        assert all(torch.isfinite(t).all() for t in state.values())
    else:
        assert os.listdir(ckpt) == ["events.jsonl"]  # the run's events only: no checkpoint


def test_bad_val_shard_fails_before_training(tmp_path, monkeypatch, tiny_data_dir, tiny_tokenizer):
    """An unreadable val shard is found at set-up, not at the final eval (which runs before the last save)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tiny_tokenizer.save(os.path.join(tmp_path, "tokenizer"))
    data_dir = os.path.join(tmp_path, "base_data")
    shutil.copytree(tiny_data_dir, data_dir)
    val = sorted(os.listdir(data_dir))[-1]
    with open(os.path.join(data_dir, val), "r+b") as f:
        f.truncate(100)
    with pytest.raises(UserError, match=rf"^shard {re.escape(os.path.join(data_dir, val))} is not a readable parquet file"):
        run("--num-iterations", "2", "--model-tag", "badval")
    assert not os.path.exists(os.path.join(tmp_path, "base_checkpoints"))


def test_script_prints_one_line_error_and_exits_nonzero(data, nanochat_base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=nanochat_base_dir)
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *TINY, "--depth", "0"],
                       capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --depth must be >= 1 (got 0)"


def test_missing_data_dir_is_one_clear_error(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tiny_tokenizer.save(os.path.join(tmp_path, "tokenizer"))
    with pytest.raises(UserError, match="no data shards"):
        run("--num-iterations", "2")


def test_two_process_gloo_run_equals_one_process_reference(data, nanochat_base_dir):
    """torchrun with 2 CPU processes (DDP, gloo) vs the same 3 steps computed in one process:
    each step averages the gradients of rank 0's and rank 1's micro-batches."""
    from nanochat.dataloader import DistributedDataLoader
    from nanochat.gpt import GPT, config_from_depth
    from nanochat.optim import lr_multiplier, muon_momentum, setup_optimizers
    from nanochat.tokenizer import get_tokenizer

    env = dict(os.environ, NANOCHAT_BASE_DIR=nanochat_base_dir, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train",
           *TINY, "--num-iterations", "3", "--model-tag", "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = os.path.join(nanochat_base_dir, "base_checkpoints", "ddp")
    ddp_state = torch.load(os.path.join(ckpt, "model_000003.pt"), weights_only=True)
    # rank 0's meta records every rank's file
    files = json.load(open(os.path.join(ckpt, "meta_000003.json")))["files"]
    assert sorted(files) == ["model_000003.pt", "optim_000003_rank0.pt", "optim_000003_rank1.pt"]
    for name, rec in files.items():
        assert rec == {"bytes": os.path.getsize(os.path.join(ckpt, name)),
                       "sha256": checkpoint.sha256_file(os.path.join(ckpt, name))}

    args = build_arg_parser().parse_args(TINY + ["--num-iterations", "3"])
    tok = get_tokenizer()
    torch.manual_seed(args.seed)
    model = GPT(config_from_depth(2, tok.get_vocab_size(), 32, 32, 32))
    model.init_weights()
    opts = setup_optimizers(model, args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.weight_decay)
    loaders = [DistributedDataLoader(tok, 4, 32, "train", "cpu", rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        for loader in loaders:
            x, y = loader.next_batch()
            (model(x, y) / 2).backward()
        lrm = lr_multiplier(step, 3, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lrm
        opts[1].param_groups[0]["momentum"] = muon_momentum(step)
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    ref = model.state_dict()
    assert ref.keys() == ddp_state.keys()
    for k in ref:
        torch.testing.assert_close(ddp_state[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_process_sparse_run_prunes_identical_masks(data, nanochat_base_dir):
    """--sparse under torchrun (gloo, masked kernel): every rank holds the same masks at each eval,
    and the checkpoint resumes across ranks."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=nanochat_base_dir, OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(__file__))
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train",
            *TINY, "--num-iterations", "4", "--eval-every", "2", "--save-every", "2", "--model-tag", "ddp_sparse",
            "--sparse", "--sparse-backend", "masked"]
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "converted 4 MLP layers to SemiSparseLinear" in r.stdout
    assert r.stdout.count("2:4 masks identical on all 2 ranks") == 3  # evals at steps 0, 2, 4
    r2 = subprocess.run(base + ["--resume-from-step", "2"], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert r2.returncode == 0, r2.stderr[-3000:]
    last = [l for l in r.stdout.splitlines() if l.startswith("step 00004 | val bpb")]
    assert last and last == [l for l in r2.stdout.splitlines() if l.startswith("step 00004 | val bpb")]


def test_fp8_and_sparse_on_cpu_warn_and_train_dense(data, capsys):
    out = run("--num-iterations", "2", "--model-tag", "fp8cpu", "--fp8", "--sparse")
    log = capsys.readouterr().out
    assert "Warning: 2:4 sparsity requires CUDA, ignoring --sparse flag" in log
    assert "Warning: --fp8 requires a CUDA GPU" in log
    assert "this run trains in fp32 as every CPU run does" in log  # CPU runs take no bf16 autocast
    assert out["summary"]["num_sparse_layers"] == 0 and len(out["history"]["loss"]) == 2


def test_due_every_n_steps_only_at_the_end_or_never():
    from nanochat.train import due
    assert [s for s in range(11) if due(4, s, last_step=s == 10)] == [0, 4, 8, 10]
    assert [s for s in range(11) if due(-1, s, last_step=s == 10)] == [10]
    assert [s for s in range(11) if due(0, s, last_step=s == 10)] == []


def test_recompute_auto_turns_on_only_where_the_run_would_not_fit(monkeypatch):
    from types import SimpleNamespace
    from nanochat.gpt import config_from_depth
    from nanochat.train import predicted_peak_bytes, use_recompute
    d26 = config_from_depth(26, 32768, 2048)
    params, tokens = 972_947_456, 16 * 2048
    # the model of the peak reproduces the measured d26 B16 dense peak (72.85 GiB, H200, compiled) within 5%
    assert abs(predicted_peak_bytes(d26, tokens, params) / 2**30 - 72.85) < 0.05 * 72.85
    cuda = torch.device("cuda", 0)
    for total_gib, expect in ((79.1, True), (139.8, False)):  # H100 80 GB, H200
        props = SimpleNamespace(total_memory=int(total_gib * 2**30))
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, props=props: props)
        assert use_recompute("auto", d26, tokens, params, cuda)[0] is expect
        assert use_recompute("auto", d26, tokens // 2, params, cuda)[0] is False  # device batch 8 fits either way
        assert use_recompute("off", d26, tokens, params, cuda)[0] is False
    assert use_recompute("on", d26, tokens, params, torch.device("cpu"))[0] is True
    assert use_recompute("auto", d26, tokens, params, torch.device("cpu"))[0] is False


@pytest.mark.parametrize("recompute", [False, True])
def test_wrap_model_compiles_with_and_without_recompute(recompute):
    import torch._functorch.config as fconfig
    from nanochat.accel.converters import LinearConverter
    from nanochat.train import wrap_model
    before = fconfig.ban_recompute_materialized_backward
    try:
        model = torch.nn.Linear(4, 4)
        compiled, ddp = wrap_model(model, False, 0, "cpu", LinearConverter("cpu"), use_compile=True, recompute=recompute)
        assert ddp is None and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
        assert fconfig.ban_recompute_materialized_backward is (not recompute and before)
        assert wrap_model(model, False, 0, "cpu", LinearConverter("cpu"), use_compile=False, recompute=recompute)[0] is model
    finally:
        fconfig.ban_recompute_materialized_backward = before


def test_abbreviated_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        build_arg_parser().parse_args(TINY + ["--num-iteration", "3"])  # not --num-iterations
    assert e.value.code == 2 and "unrecognized arguments: --num-iteration 3" in capsys.readouterr().err


def test_every_parser_refuses_abbreviations():
    root = os.path.dirname(os.path.dirname(__file__))
    calls = []
    for folder in ("scripts", "benchmarks", "nanochat"):
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".py"):
                text = open(os.path.join(root, folder, name)).read()
                calls += [(name, m.group(0)) for m in re.finditer(r"ArgumentParser\((?:[^()]|\([^()]*\))*\)", text)]
    assert [c for c in calls if "allow_abbrev=False" not in c[1]] == []
    # the benchmarks build theirs through benchmarks/common_args.py: check the parsers themselves
    import importlib
    built = [importlib.import_module(f"benchmarks.{name[:-3]}").build_arg_parser() for name in
             sorted(os.listdir(os.path.join(root, "benchmarks")))
             if name.endswith(".py") and "def build_arg_parser" in open(os.path.join(root, "benchmarks", name)).read()]
    assert len(calls) + len(built) >= 15
    assert all(p.allow_abbrev is False for p in built)


def test_short_times_print_in_seconds():
    from nanochat.metrics import duration
    assert duration(0.004) == "0.0s" and duration(42.25) == "42.2s" and duration(90) == "1.50m"
