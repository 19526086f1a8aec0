"""SIGINT and SIGTERM: the run finishes its step, saves it, releases its lock and prints one line with the
resume command; a second SIGINT stops at once; under torchrun every rank stops after the same step."""

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from nanochat.flags import build_arg_parser, strip_separator
from nanochat.train import train
from test_train import TINY

ROOT = os.path.dirname(os.path.dirname(__file__))


def start(cmd, base_dir, out_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="1")
    out, err = open(os.path.join(out_dir, "stdout"), "w+"), open(os.path.join(out_dir, "stderr"), "w+")
    return subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT), out, err


def wait_for(f, pattern, proc, timeout=120):
    """Polls the file a process writes until a line matches."""
    end = time.time() + timeout
    while time.time() < end:
        f.seek(0)
        if re.search(pattern, f.read(), re.M):
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {pattern!r}"
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} within {timeout}s")


def finished(proc, out, err):
    proc.wait(timeout=120)
    out.seek(0), err.seek(0)
    return proc.returncode, out.read(), err.read()


def sigint_in_step(monkeypatch, step_index, before=False):
    """SIGINT to this process, as Ctrl-C would send it, at the end of this (0-based) train step; with before, also
    at its start."""
    import nanochat.train
    real = nanochat.train.train_step

    def train_step(run, batches, step):
        if step == step_index and before:
            os.kill(os.getpid(), signal.SIGINT)
        result = real(run, batches, step)
        if step == step_index:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    monkeypatch.setattr(nanochat.train, "train_step", train_step)


def base_train(monkeypatch, capfd, *flags):
    """scripts/base_train.py's main() as the shell runs it: (exit code, stdout, stderr)."""
    from scripts import base_train
    monkeypatch.setattr(sys, "argv", ["base_train", *TINY, *flags])
    with pytest.raises(SystemExit) as e:
        base_train.main()
    out = capfd.readouterr()
    return e.value.code, out.out, out.err


def test_sigint_saves_the_step_and_prints_the_resume_command(tiny_data_dir, tiny_tokenizer, nanochat_base_dir,
                                                             monkeypatch, capfd):
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "sigint")
    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    sigint_in_step(monkeypatch, 1)
    rc, stdout, stderr = base_train(monkeypatch, capfd, "--num-iterations", "300", "--model-tag", "sigint")
    assert rc == 130
    notice, line = stderr.splitlines()
    assert notice == "SIGINT: stopping after this step and saving it (Ctrl-C again to stop at once without saving)"
    prefix = f"stopped by SIGINT after step 2, saved in {d}; resume with: python -m scripts.base_train "
    assert line.startswith(prefix), line
    words = shlex.split(line[len(prefix):])  # the run's flags in the parser's order, and the step
    parse = build_arg_parser().parse_args
    assert parse(words) == parse([*TINY, "--num-iterations", "300", "--model-tag", "sigint", "--resume-from-step", "2",
                                  "--depth", "2"])
    assert f"saved checkpoint step 2 to {d}" in stdout
    assert sorted(os.listdir(d)) == ["events.jsonl", "meta_000002.json", "model_000002.pt", "optim_000002_rank0.pt"]  # no .lock
    assert signal.getsignal(signal.SIGINT) is handler  # the run put back the handler it found
    monkeypatch.undo()  # the printed command resumes (a shorter horizon here, to finish fast)
    words[words.index("--num-iterations") + 1] = "3"
    words += ["--eval-every", "0", "--sample-every", "0"]  # the last of a repeated flag counts
    assert train(build_arg_parser().parse_args(words))["history"]["step"] == [3]


def test_second_sigint_stops_at_once(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, monkeypatch, capfd):
    sigint_in_step(monkeypatch, 1, before=True)  # both within step 2
    rc, stdout, stderr = base_train(monkeypatch, capfd, "--num-iterations", "300", "--model-tag", "sigint2")
    assert rc == 130
    assert stderr.splitlines()[-1] == "interrupted: nothing of the step in progress was saved"
    assert "saved checkpoint" not in stdout
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "sigint2")
    assert os.listdir(d) == ["events.jsonl"]  # lock released, no checkpoint: only the run's events


def worker_pid(launcher, rank):
    """The pid of torchrun's worker of this rank (its child with RANK=rank in the environment)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny_data_dir, tiny_tokenizer, nanochat_base_dir,
                                                                    tmp_path):
    """Preemption under torchrun: rank 1 alone gets SIGTERM; the ranks agree on the step, save it together and stop."""
    d = os.path.join(nanochat_base_dir, "base_checkpoints", "sigterm")
    # the README's form: `--` before the trainer's flags, and --run, which torchrun's parser would take for its own
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "scripts.base_train", "--", *TINY, "--num-iterations", "300", "--model-tag", "sigterm", "--run=sigterm"]
    proc, out, err = start(cmd, nanochat_base_dir, tmp_path)
    wait_for(out, r"^step 00001/", proc)
    os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)
    rc, stdout, stderr = finished(proc, out, err)
    assert rc != 0  # the workers exit 143; torchrun reports them
    m = re.search(rf"^stopped by SIGTERM after step (\d+), saved in {re.escape(d)}; resume with: "
                  r"(torchrun --standalone --nproc_per_node=2 -m scripts.base_train -- .*--resume-from-step (\d+))$",
                  stderr, re.M)
    assert m and m.group(1) == m.group(3), stderr[-3000:]
    step = int(m.group(1))
    assert stdout.count("saved checkpoint") == 1
    if importlib.util.find_spec("wandb") is None:
        assert stdout.count("Warning: --run sigterm logs to wandb, which is not installed") == 1
    launch = torchrun_parse(m.group(2))  # the resume command parses as written
    assert launch.nproc_per_node == "2"
    args = build_arg_parser().parse_args(strip_separator(launch.training_script_args))
    assert (args.run, args.model_tag, args.resume_from_step) == ("sigterm", "sigterm", step)
    assert sorted(os.listdir(d)) == ["events.jsonl", f"meta_{step:06d}.json", f"model_{step:06d}.pt",
                                     f"optim_{step:06d}_rank0.pt", f"optim_{step:06d}_rank1.pt"]


def torchrun_parse(command):
    """torchrun's parse of a documented command, and the trainer's of what it hands the workers."""
    from torch.distributed.run import get_args_parser
    words = shlex.split(command)
    assert words[0] == "torchrun", command
    launch = get_args_parser().parse_args(words[1:])
    assert launch.module and launch.training_script in ("scripts.base_train", "scripts.base_eval"), command
    if launch.training_script == "scripts.base_train":
        build_arg_parser().parse_args(strip_separator(launch.training_script_args))
    return launch


def documented_torchrun_commands():
    """Every torchrun command in README.md, docs/ and the scripts' docstrings, continuation lines joined."""
    paths = [os.path.join(ROOT, "README.md")] + \
        [os.path.join(ROOT, top, f) for top in ("docs", "scripts") for f in sorted(os.listdir(os.path.join(ROOT, top)))
         if f.endswith((".md", ".py"))]
    commands = []
    for path in paths:
        text = open(path).read().replace("\\\n", " ")
        commands += [re.sub(r"\s*(\[--\w+\]\s*)+", " ", line).strip()  # a docstring's [--optional] flags
                     for line in text.splitlines() if line.strip().startswith("torchrun ")]
    return commands


def test_documented_torchrun_commands_parse_as_written():
    commands = documented_torchrun_commands()
    assert len(commands) >= 5, commands
    with_run = [c for c in commands if "--run=" in c]
    assert with_run
    for command in commands:
        torchrun_parse(command)
    # the same without `--`: torchrun's parser reads --run=... as an abbreviation of its --run-path
    with pytest.raises(SystemExit):
        torchrun_parse(with_run[0].replace(" -- ", " "))
    assert strip_separator(["--", "--depth=2"]) == ["--depth=2"]
