"""Checkpoint integrity: every damaged file is one error naming it and the steps still complete,
nothing on disk changes, .pt files load with weights_only=True, and keep-last-k / --overwrite
delete only what they should."""

import argparse
import hashlib
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
from test_train import run

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def saved(tiny_data_dir, tiny_tokenizer, nanochat_base_dir):
    """A tiny run saved at steps 2, 4 and 6 (tag ckpt_src); tests corrupt copies of it."""
    run("--num-iterations", "6", "--save-every", "2", "--model-tag", "ckpt_src")
    return os.path.join(nanochat_base_dir, "base_checkpoints", "ckpt_src")


@pytest.fixture
def copy(saved, request):
    """A fresh copy of the saved run under its own tag; returns (tag, dir)."""
    tag = "ckpt_" + re.sub(r"\W", "_", request.node.name)
    dst = os.path.join(os.path.dirname(saved), tag)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(saved, dst)
    return tag, dst


def digests(d):
    return {n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest() for n in sorted(os.listdir(d))}


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def flip_byte(path, offset=5000):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


CORRUPTIONS = {
    "truncated_model": ("model_000006.pt", lambda p: truncate(p, 1000), r"1,000 bytes, the meta file recorded [\d,]+"),
    "zero_byte_model": ("model_000006.pt", lambda p: truncate(p, 0), r"0 bytes, the meta file recorded [\d,]+"),
    "flipped_model": ("model_000006.pt", flip_byte, "its sha256 differs from the one the meta file recorded"),
    "truncated_optim": ("optim_000006_rank0.pt", lambda p: truncate(p, 1000), r"1,000 bytes, the meta file recorded"),
    "deleted_optim": ("optim_000006_rank0.pt", os.remove, "missing"),
    "broken_meta": ("meta_000006.json", lambda p: write_text(p, '{"step": 6, "model_con'),
                    "not valid JSON: Unterminated string"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damaged_file_is_one_error_naming_it(copy, kind):
    tag, d = copy
    name, corrupt, why = CORRUPTIONS[kind]
    corrupt(os.path.join(d, name))
    before = digests(d)
    with pytest.raises(UserError) as e:
        run("--num-iterations", "8", "--model-tag", tag, "--resume-from-step", "6")
    assert re.fullmatch(rf"checkpoint file {re.escape(os.path.join(d, name))} is damaged \({why}.*\): "
                        rf"saved steps with complete files: 2, 4; use --resume-from-step 4", str(e.value)), str(e.value)
    assert "processes" not in str(e.value)  # a deleted file is not blamed on the process count
    assert digests(d) == before


def test_no_complete_step_left_says_start_over(copy):
    tag, d = copy
    for step in (2, 4, 6):
        truncate(os.path.join(d, f"model_{step:06d}.pt"), 10)
    with pytest.raises(UserError, match=r"model_000006.pt is damaged \(10 bytes.*no other saved step has complete files: "
                                        r"start over with --overwrite or a new --model-tag$"):
        run("--num-iterations", "8", "--model-tag", tag, "--resume-from-step", "6")


def test_files_match_meta_and_load_weights_only(saved):
    meta = json.load(open(os.path.join(saved, "meta_000006.json")))
    assert meta["format"] == checkpoint.FORMAT
    assert sorted(meta["files"]) == ["model_000006.pt", "optim_000006_rank0.pt"]
    for name, rec in meta["files"].items():
        path = os.path.join(saved, name)
        assert rec == {"bytes": os.path.getsize(path), "sha256": checkpoint.sha256_file(path)}
        torch.load(path, weights_only=True)  # no pickled objects: tensors and plain containers only
    assert not [n for n in os.listdir(saved) if ".tmp" in n]


def test_pickled_object_is_refused(copy):
    tag, d = copy
    path = os.path.join(d, "optim_000006_rank0.pt")
    state = torch.load(path, weights_only=True)
    state["loader"] = argparse.Namespace(epoch=0)  # any class instance: unpickling it could run code
    torch.save(state, path)
    meta_path = os.path.join(d, "meta_000006.json")
    meta = json.load(open(meta_path))
    meta["files"]["optim_000006_rank0.pt"] = {"bytes": os.path.getsize(path), "sha256": checkpoint.sha256_file(path)}
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match=rf"checkpoint file {re.escape(path)} holds pickled Python objects .* "
                                        r"it was not written by this trainer"):
        run("--num-iterations", "8", "--model-tag", tag, "--resume-from-step", "6")


def test_meta_without_checksums_still_loads(copy):
    """Checkpoints written before sizes and checksums were recorded resume unchecked."""
    tag, d = copy
    meta_path = os.path.join(d, "meta_000006.json")
    meta = json.load(open(meta_path))
    del meta["files"], meta["format"]
    json.dump(meta, open(meta_path, "w"))
    out = run("--num-iterations", "7", "--model-tag", tag, "--resume-from-step", "6")
    assert out["history"]["step"] == [7]
    truncate(os.path.join(d, "model_000006.pt"), 1000)
    with pytest.raises(UserError, match=r"model_000006.pt is damaged \(torch.load: RuntimeError: PytorchStreamReader"):
        run("--num-iterations", "8", "--model-tag", tag, "--resume-from-step", "6")


def test_other_world_size_is_named_before_missing_files(copy):
    tag, d = copy
    meta_path = os.path.join(d, "meta_000006.json")
    meta = json.load(open(meta_path))
    meta["world_size"] = 2
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match=r"saved by 2 processes, this run has 1: resume with --nproc_per_node=2"):
        run("--num-iterations", "8", "--model-tag", tag, "--resume-from-step", "6")


@pytest.mark.parametrize("num_iterations", ["5", "6"])
def test_resume_at_or_past_the_horizon_stops_before_any_step(copy, num_iterations):
    tag, d = copy
    before = digests(d)
    with pytest.raises(UserError, match=rf"^cannot resume from step 6: the run ends at step {num_iterations} "
                                        rf"\(--num-iterations {num_iterations}\); pass --num-iterations greater than 6"):
        run("--num-iterations", num_iterations, "--model-tag", tag, "--resume-from-step", "6")
    assert digests(d) == before


def test_fresh_run_into_a_saved_tag_stops_and_overwrite_replaces_it(copy):
    tag, d = copy
    before = digests(d)
    with pytest.raises(UserError, match=rf"^{re.escape(d)} already holds checkpoints of another run \(steps 2, 4, 6\): "
                                        r"continue it with --resume-from-step 6, replace it with --overwrite, "
                                        r"or pick a new --model-tag$"):
        run("--num-iterations", "3", "--model-tag", tag)
    assert digests(d) == before
    run("--num-iterations", "3", "--model-tag", tag, "--overwrite")
    assert sorted(os.listdir(d)) == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]


def test_keep_last_k_keeps_the_newest(tiny_data_dir, tiny_tokenizer, nanochat_base_dir):
    run("--num-iterations", "5", "--save-every", "1", "--keep-last-k", "2", "--model-tag", "keep2")
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "keep2")
    assert checkpoint.saved_steps(d) == [4, 5]
    assert sorted(os.listdir(d)) == ["meta_000004.json", "meta_000005.json", "model_000004.pt", "model_000005.pt",
                                     "optim_000004_rank0.pt", "optim_000005_rank0.pt"]


def fake_steps(d, steps, ranks=2):
    os.makedirs(d, exist_ok=True)
    for s in steps:
        for name in [f"model_{s:06d}.pt", f"meta_{s:06d}.json"] + [f"optim_{s:06d}_rank{r}.pt" for r in range(ranks)]:
            open(os.path.join(d, name), "w").close()


@pytest.mark.parametrize("keep, current, replaced, left", [
    (2, 40, (), [30, 40, 50]),        # 50 comes from the run this one resumed from: left alone
    (1, 40, (), [40, 50]),
    (0, 40, (), [10, 20, 30, 40, 50]),  # 0 keeps all
    (9, 40, (), [10, 20, 30, 40, 50]),
    (3, 40, (10, 20, 30, 40, 50), [40]),  # --overwrite: the earlier run's steps go, the one just saved stays
])
def test_prune_checkpoints(tmp_path, keep, current, replaced, left):
    d = str(tmp_path)
    fake_steps(d, [10, 20, 30, 40, 50])
    checkpoint.prune_checkpoints(d, current, keep, replaced)
    assert checkpoint.saved_steps(d) == left
    assert len(os.listdir(d)) == 4 * len(left)  # model, meta and both ranks' files of each step, nothing else


def test_base_sample_on_damaged_checkpoint_is_one_line(copy, nanochat_base_dir):
    tag, d = copy
    flip_byte(os.path.join(d, "model_000006.pt"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=nanochat_base_dir)
    r = subprocess.run([sys.executable, "-m", "scripts.base_sample", "--model-tag", tag, "--device-type", "cpu"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: checkpoint file {d}/model_000006.pt is damaged (its sha256 differs from the one "
                                f"the meta file recorded): saved steps with complete files: 2, 4; use --step 4")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0, 0 for greedy (got -1.0)"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1 (got 0)"),
    (["--top-k", "-1"], "--top-k must be >= 1, or 0 for no top-k filtering (got -1)"),
])
def test_base_sample_flags(saved, monkeypatch, flags, message):
    from scripts import base_sample
    monkeypatch.setattr(sys, "argv", ["base_sample", "--model-tag", "ckpt_src", "--device-type", "cpu", *flags])
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        base_sample.main()
