"""nanochat/common.py: a torchrun worker ends with its launcher."""

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
