"""Checkpoint integrity: every damaged file is one error naming it and the steps still complete,
nothing on disk changes, .pt files load with weights_only=True, and keep-last-k / --overwrite
delete only what they should."""

import argparse
import errno
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
    assert sorted(os.listdir(d)) == ["events.jsonl", "meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt"]


def test_keep_last_k_keeps_the_newest(tiny_data_dir, tiny_tokenizer, nanochat_base_dir):
    run("--num-iterations", "5", "--save-every", "1", "--keep-last-k", "2", "--model-tag", "keep2")
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "keep2")
    assert checkpoint.saved_steps(d) == [4, 5]
    assert sorted(os.listdir(d)) == ["events.jsonl", "meta_000004.json", "meta_000005.json", "model_000004.pt",
                                     "model_000005.pt", "optim_000004_rank0.pt", "optim_000005_rank0.pt"]


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
    (["--device-type", "gpu"], "unknown --device-type 'gpu': use cuda, cpu or mps (or leave it empty to autodetect)"),
    pytest.param(["--device-type", "cuda"], "--device-type cuda but no CUDA GPU is visible: use --device-type cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")),
])
def test_base_sample_flags(saved, monkeypatch, flags, message):
    from scripts import base_sample
    monkeypatch.setattr(sys, "argv", ["base_sample", "--model-tag", "ckpt_src", "--device-type", "cpu", *flags])
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        base_sample.main()


# ---------------------------------------------------------------------------
# One run per tag, collapse, storage faults, tokenizer identity, resume choices

HOLD_AT_STEP_2 = """
import os, sys, time
sys.path.insert(0, "tests")
from nanochat.flags import build_arg_parser
from nanochat.metrics import Metrics
from nanochat.train import train
from test_train import TINY
ready, go = sys.argv[1], sys.argv[2]
real = Metrics.log_step
def log_step(self, step, *a):
    out = real(self, step, *a)
    if step == 2:  # step 1 is saved by now; hold the run (and its lock) until the test says go
        open(ready, "w").close()
        deadline = time.time() + 120
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.05)
    return out
Metrics.log_step = log_step
train(build_arg_parser().parse_args(TINY + sys.argv[3:]))
"""


def test_second_run_on_a_tag_stops_at_start_and_the_first_is_intact(tiny_data_dir, tiny_tokenizer, nanochat_base_dir,
                                                                       tmp_path):
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "locked")
    ready, go = str(tmp_path / "ready"), str(tmp_path / "go")
    first = subprocess.Popen([sys.executable, "-c", HOLD_AT_STEP_2, ready, go, "--num-iterations", "3", "--save-every",
                              "1", "--model-tag", "locked"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(os.environ, NANOCHAT_BASE_DIR=nanochat_base_dir))
    try:
        for _ in range(1200):
            if os.path.exists(ready) or first.poll() is not None:
                break
            import time
            time.sleep(0.1)
        assert os.path.exists(ready), first.communicate()[1][-3000:]
        before = digests(d)
        with pytest.raises(UserError, match=rf"^{re.escape(d)} is in use by another run \(pid {first.pid} on host "
                                            r"\S+ since \d{4}-\d\d-\d\dT[\d:]+\+00:00\): wait for it to end or stop it, "
                                            r"or pick another --model-tag$"):
            run("--num-iterations", "3", "--depth", "1", "--model-tag", "locked", "--overwrite")
        assert digests(d) == before
    finally:
        open(go, "w").close()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert "saved checkpoint step 3" in out
    assert checkpoint.saved_steps(d) == [1, 2, 3] and not os.path.exists(os.path.join(d, ".lock"))
    for step in (1, 2, 3):
        checkpoint.load_checkpoint(d, step, "cpu")  # sizes and checksums as the first run recorded them


def test_lock_of_a_dead_run_is_taken_over_with_a_warning(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, capsys):
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "stale_lock")
    os.makedirs(d, exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_text(os.path.join(d, ".lock"), json.dumps(dict(pid=dead.pid, host="here", since="2026-01-01T00:00:00+00:00")))
    write_text(os.path.join(d, f"model_000001.pt.tmp{dead.pid}"), "half a file")  # a save killed midway
    run("--num-iterations", "1", "--model-tag", "stale_lock")
    log = capsys.readouterr().out
    assert f"Warning: took over the lock of {d} from a run that is gone (pid {dead.pid} on host here since " \
           "2026-01-01T00:00:00+00:00)" in log
    assert f"removed 1 temp files of stopped runs from {d}" in log
    assert sorted(os.listdir(d)) == ["events.jsonl", "meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]


@pytest.mark.parametrize("lr, message", [
    # lr 1e6: the loss of step 3's weights is ~15 (ln(512) = 6.24), finite: the smoothed loss rises from step 4 on
    ("1e6", r"training collapsed at step 6 though the loss is finite: the smoothed loss [\d.]+ has stayed more than "
            r"1.5 nats above its best \(\d.\d+\) for 3 steps \(since step 4\); step 6 was not saved; the newest "
            r"checkpoint from before the collapse is step 2 \(--resume-from-step 2\); lower the learning rates"),
    # lr 1e30: step 3's weights are finite (up to ~1e30) but their loss is not
    ("1e30", r"training diverged at step 3 \(the loss of its weights is nan\) and nothing of that step was saved; the "
             r"newest checkpoint is step 2 \(--resume-from-step 2\); lower the learning rates"),
])
def test_bad_run_saves_no_bad_weights_and_its_advice_resumes(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, lr,
                                                              message, capsys):
    """A resumed run trains with the learning rates of its command line (the checkpoint gives only the optimizer's
    moments). A checkpoint is written only once its own loss passed the checks, so the step the error names holds
    good weights (keep-last-k never deletes it), and resuming there with lower learning rates, as it advises,
    trains on."""
    tag = f"bad_lr_{lr}"
    quick = ["--eval-every", "0", "--sample-every", "0"]
    run("--num-iterations", "2", "--model-tag", tag, *quick)
    with pytest.raises(UserError, match=message):
        run("--num-iterations", "10", "--save-every", "1", "--keep-last-k", "1", "--collapse-steps", "3",
            "--matrix-lr", lr, "--embedding-lr", lr, "--unembedding-lr", lr, "--model-tag", tag,
            "--resume-from-step", "2", *quick)
    assert f"resuming step 2 with flags that differ from its run's: --embedding-lr {float(lr)} (checkpoint: 0.2), " \
           f"--unembedding-lr {float(lr)} (checkpoint: 0.004), --matrix-lr {float(lr)} (checkpoint: 0.02), " \
           f"--num-iterations 10 (checkpoint: 2)" in capsys.readouterr().out
    d = os.path.join(nanochat_base_dir, "base_checkpoints", tag)
    assert checkpoint.saved_steps(d)[0] == 2 and 3 not in checkpoint.saved_steps(d)  # step 3's weights: loss ~15 or nan
    state, _, _ = checkpoint.load_checkpoint(d, 2, "cpu")
    assert max(t.abs().max().item() for t in state.values()) < 100
    out = run("--num-iterations", "6", "--model-tag", tag, "--resume-from-step", "2", "--collapse-steps", "3", *quick)
    assert out["history"]["step"] == [3, 4, 5, 6] and max(out["history"]["loss"]) < 7


def test_best_val_bpb_checkpoint_is_kept_and_recorded(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, monkeypatch):
    import nanochat.train
    scripted = iter([4.0, 3.0, 2.0, 2.5, 2.6])  # val bpb at steps 0, 2, 4, 6, 8: best at step 4
    monkeypatch.setattr(nanochat.train, "validate", lambda run, log: next(scripted))
    run("--num-iterations", "8", "--save-every", "2", "--eval-every", "2", "--keep-last-k", "1", "--model-tag", "bestval")
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "bestval")
    assert checkpoint.saved_steps(d) == [4, 8]  # keep-last-k 1, and the best val bpb
    assert [checkpoint.load_meta(d, s)["val_bpb"] for s in (4, 8)] == [2.0, 2.6]


def failing_writes(monkeypatch, at_step, error=errno.ENOSPC):
    """From the save of at_step on, every checkpoint write gets half its bytes onto the disk, then `error`."""
    real_save, real_write = checkpoint.save_checkpoint, checkpoint._HashingWriter.write
    state = {"fail": False}

    def save(checkpoint_dir, step, *args, **kwargs):
        state["fail"] = step >= at_step
        return real_save(checkpoint_dir, step, *args, **kwargs)

    def write(self, data):
        if state["fail"]:
            self.f.write(bytes(data)[:len(data) // 2])
            raise OSError(error, os.strerror(error))
        return real_write(self, data)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    monkeypatch.setattr(checkpoint._HashingWriter, "write", write)


def test_full_disk_at_save_is_one_line_and_leaves_earlier_checkpoints(tiny_data_dir, tiny_tokenizer, nanochat_base_dir,
                                                                      monkeypatch, tmp_path):
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "enospc")
    failing_writes(monkeypatch, at_step=2)
    with pytest.raises(UserError, match=rf"^saving checkpoint step 2 to {re.escape(d)} failed \(No space left on device; "
                                        r"[\d,]+ bytes free there\): the earlier checkpoints are intact \(newest: step 1, "
                                        r"--resume-from-step 1\); free space or fix the disk$"):
        run("--num-iterations", "3", "--save-every", "1", "--model-tag", "enospc")
    assert sorted(os.listdir(d)) == ["events.jsonl", "meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]  # no temp files
    checkpoint.load_checkpoint(d, 1, "cpu")
    # reports: the same one line
    from nanochat import report
    monkeypatch.setattr(report, "_write_atomic", lambda path, text: failing_text_write(path))
    with pytest.raises(UserError, match=rf"^writing the report to {re.escape(str(tmp_path))} failed \(No space left on "
                                        r"device; [\d,]+ bytes free there\): free space"):
        report.write_eval_report(str(tmp_path), dict(model_tag="x", step=1, date="-", device="cpu", world_size=1,
                                                      checkpoint_dir=d, sparse=False, fp8=False))


def failing_text_write(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_no_room_for_the_checkpoints_stops_before_training(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, monkeypatch):
    from nanochat import storage
    monkeypatch.setattr(storage, "free_bytes", lambda path: 2_000_000)  # about one checkpoint of this model
    with pytest.raises(UserError, match=r"^the checkpoint directory .*/base_checkpoints/noroom has 2,000,000 bytes free, "
                                        r"[\d,]+ needed for 4 checkpoints of ~[\d,]+ bytes: free space there"):
        run("--num-iterations", "8", "--save-every", "2", "--model-tag", "noroom")
    assert not os.path.exists(os.path.join(nanochat_base_dir, "base_checkpoints", "noroom"))


def test_read_only_base_dir_stops_before_training(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, monkeypatch):
    """chmod alone does not stop root (the tests may run as root): os.open also fails there with EROFS,
    as on a read-only mount. Without the start-up check the run would train and save (torch.save does not
    use os.open), so this test fails if the check is gone."""
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "readonly")
    os.makedirs(d)
    real_open = os.open

    def ro_open(path, flags, *args, **kwargs):
        if str(path).startswith(d) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    os.chmod(d, 0o555)
    try:
        monkeypatch.setattr(os, "open", ro_open)
        with pytest.raises(UserError, match=rf"^the checkpoint directory {re.escape(d)} is not writable \(Read-only "
                                            r"file system; [\d,]+ bytes free\): fix its permissions or mount"):
            run("--num-iterations", "2", "--model-tag", "readonly")
    finally:
        os.chmod(d, 0o755)
    assert os.listdir(d) == []


def test_tokenizer_of_another_size_is_named_with_the_rebuild_command(copy, tmp_path, monkeypatch, tiny_data_dir):
    from nanochat.tokenizer import Tokenizer
    from scripts import base_sample
    from scripts.tok_train import iter_training_text
    tag, d = copy
    base = tmp_path / "base"
    shutil.copytree(d, base / "base_checkpoints" / tag)
    Tokenizer.train_from_iterator(iter_training_text(200_000, 10_000, tiny_data_dir), 300).save(str(base / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setattr(sys, "argv", ["base_sample", "--model-tag", tag, "--device-type", "cpu", "--max-tokens", "2"])
    message = (rf"^checkpoint {re.escape(str(base / 'base_checkpoints' / tag))} step 6 was trained with a tokenizer of "
               rf"vocab size 512, but {re.escape(str(base / 'tokenizer'))} holds one of vocab size 300: "
               r"run `python -m scripts.tok_train --vocab-size 512` on the data the model was trained on$")
    with pytest.raises(UserError, match=message):
        base_sample.main()
    with pytest.raises(UserError, match=message.replace("step 6", "step 4")):
        run("--num-iterations", "8", "--model-tag", tag, "--resume-from-step", "4")
    # a checkpoint from before the meta recorded the tokenizer: the model's vocab size decides
    meta_path = base / "base_checkpoints" / tag / "meta_000006.json"
    meta = json.load(open(meta_path))
    del meta["tokenizer"]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(UserError, match=message):
        base_sample.main()


def test_meta_without_tokenizer_fields_still_loads(copy, capsys, monkeypatch):
    from scripts import base_sample
    tag, d = copy
    for step in (4, 6):
        meta_path = os.path.join(d, f"meta_{step:06d}.json")
        meta = json.load(open(meta_path))
        del meta["tokenizer"], meta["total_batch_size"], meta["val_bpb"]
        json.dump(meta, open(meta_path, "w"))
    monkeypatch.setattr(sys, "argv", ["base_sample", "--model-tag", tag, "--device-type", "cpu", "--max-tokens", "2"])
    base_sample.main()
    assert capsys.readouterr().out.strip()
    assert run("--num-iterations", "5", "--model-tag", tag, "--resume-from-step", "4")["history"]["step"] == [5]


def test_resume_with_another_batch_size_stops_unless_allowed(copy):
    tag, d = copy
    before = digests(d)
    with pytest.raises(UserError, match=r"^checkpoint step 6 was trained with --device-batch-size 4 and 256 tokens per "
                                        r"step, this run has 8 and 512: pass the same --device-batch-size/"
                                        r"--total-batch-size, or --allow-batch-change to continue with these \(the data "
                                        r"continues from the saved position"):
        run("--num-iterations", "7", "--model-tag", tag, "--resume-from-step", "6", "--device-batch-size", "8",
            "--total-batch-size", "512")
    assert digests(d) == before
    out = run("--num-iterations", "7", "--model-tag", tag, "--resume-from-step", "6", "--device-batch-size", "8",
              "--total-batch-size", "512", "--allow-batch-change")
    assert out["history"]["step"] == [7]


def test_resume_from_latest_picks_the_newest_intact_step(copy, capsys):
    tag, d = copy
    truncate(os.path.join(d, "model_000006.pt"), 1000)
    out = run("--num-iterations", "5", "--model-tag", tag, "--resume-from-step", "latest")
    assert out["history"]["step"] == [5]
    assert "--resume-from-step latest: step 4" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^--resume-from-step latest: no checkpoint with complete files in .*/nothing_here "
                                        r"\(tags with checkpoints: .*\): check --model-tag, or start a fresh run$"):
        run("--num-iterations", "5", "--model-tag", "nothing_here", "--resume-from-step", "latest")


def test_unknown_tag_lists_the_tags_that_exist(saved):
    with pytest.raises(UserError, match=r"^no checkpoints in .*/base_checkpoints/d12: train first .* or check "
                                        r"--model-tag \(tags with checkpoints: .*ckpt_src.*\)$"):
        checkpoint.load_model_for_inference(os.path.join(os.path.dirname(saved), "d12"))


def test_prune_keeps_protected_steps(tmp_path):
    d = str(tmp_path)
    fake_steps(d, [10, 20, 30, 40, 50])
    assert checkpoint.prune_checkpoints(d, 40, 1, protect={20}) == [10, 30]
    assert checkpoint.saved_steps(d) == [20, 40, 50]


def test_base_eval_bpb_on_cpu_is_bounded_and_shows_progress(copy, monkeypatch, capsys, tmp_path):
    from scripts import base_eval
    tag, d = copy
    meta_path = os.path.join(d, "meta_000006.json")
    meta = json.load(open(meta_path))
    meta["args"]["eval_tokens"] = 20 * 524288  # a run trained with --eval-every 0 keeps the GPU-sized default
    json.dump(meta, open(meta_path, "w"))
    monkeypatch.setattr(base_eval, "CPU_EVAL_TOKENS", 512)
    results = base_eval.evaluate(base_eval.build_arg_parser().parse_args(
        ["--model-tag", tag, "--eval", "bpb", "--device-type", "cpu", "--out-dir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert results["bpb"]["tokens"] == 512
    assert "val bpb on CPU: 512 tokens, not the run's 10,485,760 (--eval-tokens N for more)" in out
    assert "val bpb: batch 2/4" in out


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MB tmpfs, where this machine lets the tests mount one (root with CAP_SYS_ADMIN)."""
    path = str(tmp_path / "tmpfs")
    os.makedirs(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", path], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: test_full_disk_at_save_... covers the same with a failing writer")
    yield path
    subprocess.run(["umount", "-l", path])  # lazy: a file the failed run left open must not keep it mounted


def test_real_full_disk_at_save(small_tmpfs, tiny_data_dir, tiny_tokenizer, monkeypatch):
    """The same on a filesystem that really fills up after the start-up check: torch.save's error (a
    RuntimeError over the ENOSPC) is one line, its temp files are gone and step 1 is intact."""
    shutil.copytree(tiny_data_dir, os.path.join(small_tmpfs, "base_data"))
    tiny_tokenizer.save(os.path.join(small_tmpfs, "tokenizer"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", small_tmpfs)
    real_save = checkpoint.save_checkpoint

    def fill_then_save(checkpoint_dir, step, *args, **kwargs):
        if step == 2:  # another writer takes the rest of the disk
            with open(os.path.join(small_tmpfs, "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                except OSError:
                    pass
        return real_save(checkpoint_dir, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", fill_then_save)
    d = os.path.join(small_tmpfs, "base_checkpoints", "full")
    with pytest.raises(UserError, match=rf"^saving checkpoint step 2 to {re.escape(d)} failed \(No space left on device; "
                                        r"[\d,]+ bytes free there\): the earlier checkpoints are intact \(newest: step 1"):
        run("--num-iterations", "3", "--save-every", "1", "--keep-last-k", "1", "--eval-every", "0", "--model-tag", "full")
    assert sorted(os.listdir(d)) == ["events.jsonl", "meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
    checkpoint.load_checkpoint(d, 1, "cpu")

# ---------------------------------------------------------------------------
# Every file of a two-process checkpoint: a flipped byte is refused by every rank that reads the file


def _save_two_rank_checkpoint(checkpoint_dir, rank, world):
    """Rank `rank` of a 2-process gloo group saves step 3 of a tiny state (each rank its own optimizer file)."""
    torch.manual_seed(rank)
    model_state = {"w": torch.randn(64, 64)}
    optimizer_states = [{"state": {0: {"exp_avg": torch.randn(64, 64)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}]
    checkpoint.save_checkpoint(checkpoint_dir, 3, model_state, optimizer_states, {"pos": rank},
                               {"model_config": {"n_layer": 1}, "world_size": world}, rank)


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory):
    from functools import partial

    from tests.gloo_workers import spawn_gloo
    d = str(tmp_path_factory.mktemp("two_ranks") / "ckpt")
    spawn_gloo(partial(_save_two_rank_checkpoint, d), 2, tmp_path_factory.mktemp("gloo"))
    assert sorted(os.listdir(d)) == ["meta_000003.json", "model_000003.pt", "optim_000003_rank0.pt",
                                     "optim_000003_rank1.pt"]
    assert sorted(json.load(open(os.path.join(d, "meta_000003.json")))["files"]) == sorted(os.listdir(d))[1:]
    return d


@pytest.mark.parametrize("name, readers", [
    ("model_000003.pt", (0, 1)),
    ("optim_000003_rank0.pt", (0,)),
    ("optim_000003_rank1.pt", (1,)),
    ("meta_000003.json", (0, 1)),
])
def test_flipped_byte_in_any_file_of_a_two_rank_checkpoint_is_refused(two_rank_checkpoint, tmp_path, name, readers):
    d = str(tmp_path / "ckpt")
    shutil.copytree(two_rank_checkpoint, d)
    for rank in (0, 1):  # intact: each rank loads its own optimizer file
        _, rank_state, _ = checkpoint.load_checkpoint(d, 3, "cpu", rank=rank)
        assert rank_state["loader"] == {"pos": rank}
    path = os.path.join(d, name)
    flip_byte(path, offset=os.path.getsize(path) // 2)
    why = r"not valid JSON: .*" if name.startswith("meta") else "its sha256 differs from the one the meta file recorded"
    for rank in readers:
        with pytest.raises(UserError) as e:
            checkpoint.load_checkpoint(d, 3, "cpu", rank=rank)
        assert "\n" not in str(e.value)
        assert re.fullmatch(rf"checkpoint file {re.escape(path)} is damaged \({why}\): no other saved step has complete "
                            rf"files: start over with --overwrite or a new --model-tag", str(e.value)), str(e.value)


def test_resume_from_latest_skips_a_newest_step_of_the_same_size_but_other_bytes(copy, capsys):
    """Sizes alone pass a flipped byte: latest checks each step's sha256, newest first, and names what it skips."""
    tag, d = copy
    flip_byte(os.path.join(d, "optim_000006_rank0.pt"))
    flip_byte(os.path.join(d, "model_000004.pt"))
    out = run("--num-iterations", "3", "--model-tag", tag, "--resume-from-step", "latest")
    assert out["history"]["step"] == [3]
    assert re.search(r"--resume-from-step latest: step 2 \(skipped step 6: \S+/optim_000006_rank0.pt is damaged \(its "
                     r"sha256 differs from the one the meta file recorded\); skipped step 4: \S+/model_000004.pt is "
                     r"damaged", capsys.readouterr().out)
