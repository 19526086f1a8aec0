"""nanochat/common.py: a torchrun worker ends with its launcher; the base directory. The Makefile's quoting."""

import os
import signal
import subprocess
import sys
import time

import pytest

LAUNCHER = r"""
import os, subprocess, sys, time
env = dict(os.environ, TORCHELASTIC_RUN_ID="test")
child = subprocess.Popen([sys.executable, "-c",
    "import time; from nanochat.common import die_with_launcher; assert die_with_launcher(); "
    "print('armed', flush=True); time.sleep(60)"], env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
time.sleep(60)
"""


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not reaped yet
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_worker_in_its_own_session_dies_with_a_killed_launcher():
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    assert alive(worker)
    os.kill(launcher.pid, signal.SIGKILL)  # as a user kills torchrun
    launcher.wait()
    deadline = time.time() + 10
    while alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(worker), "the worker outlived its launcher"


def test_base_dir_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    from nanochat.common import UserError, get_base_dir
    path = tmp_path / "a_file"
    path.write_text("")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(path))
    with pytest.raises(UserError, match=rf"^the base directory {path} is a file, not a directory: set NANOCHAT_BASE_DIR "
                                        r"to a directory"):
        get_base_dir()


def test_make_sample_passes_a_prompt_with_quotes_intact(tmp_path):
    """The Makefile hands PROMPT to the shell through the environment: quotes in it are text, not syntax."""
    root = os.path.dirname(os.path.dirname(__file__))
    echo = f"{sys.executable} -c 'import sys; print(sys.argv[-1])'"
    prompt = "it's \"quoted\" `not run`; exit 1"
    r = subprocess.run(["make", "-s", "-o", ".venv/.installed", "sample", f"PROMPT={prompt}", f"PY={echo}"],
                       cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == prompt + "\n"
