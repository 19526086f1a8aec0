"""benchmarks/resume_check.py on CPU: 2 processes under torchrun (gloo), the launcher SIGKILLed between two
saves, resumed to the unbroken run's curve bit-exactly; and its comparison catching a difference."""

import json
import os
import subprocess
import sys

from benchmarks.resume_check import alive, compare_curves

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = ["--device-type", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32",
        "--device-batch-size", "4", "--total-batch-size", "512", "--warmup-steps", "2", "--eval-every", "5",
        "--eval-tokens", "256", "--sample-every", "0"]


def test_killed_two_process_run_resumes_bit_exactly(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=nanochat_base_dir, OMP_NUM_THREADS="1")
    out = str(tmp_path / "rc")
    cmd = [sys.executable, "-m", "benchmarks.resume_check", "--nproc", "2", "--save-every", "5", "--kill-step", "7",
           "--orphan-wait", "0.5", "--out", out, "--", *TINY]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    row = json.load(open(out + ".json"))["results"][0]
    assert row["passed"] and row["bit_exact"] and row["weights_bit_exact"] and row["max_abs_diff"] == 0
    assert (row["mode"], row["nproc"], row["micro_batches"], row["kill_step"]) == ("dense", 2, 2, 7)
    # the newest complete checkpoint: step 5, or 10 if the orphaned workers got to save it
    assert row["resume_step"] in (5, 10) and row["steps_compared"] == 15 - row["resume_step"]
    kill = row["kill"]
    assert len(kill["alive_at_kill"]) == 2  # torchrun's two workers, each in a session of its own
    assert kill["still_alive_after_cleanup"] == [] and alive(kill["alive_at_kill"]) == []
    assert row["val_bpb"] == row["val_bpb_ref"] is not None
    assert os.path.exists(out + ".md")
    # the curves came from each run's events: the resumed one starts at the resume step
    from nanochat.metrics import read_events
    (start,) = read_events(row["events"]["resumed"], "start")
    assert start["step"] == row["resume_step"] and start["world_size"] == 2


def test_compare_curves_reports_the_first_difference():
    ref = dict(loss={1: ("5.0000", "5.0000"), 2: ("4.5000", "4.8000"), 3: ("4.0000", "4.6000")}, val={3: "2.0000"})
    other = dict(loss={2: ("4.5000", "4.8000"), 3: ("4.0010", "4.6001")}, val={3: "2.0000"})
    c = compare_curves(ref, other, 1, 3)
    assert not c["bit_exact"] and c["first_differing_step"] == 3 and c["missing_steps"] == []
    assert abs(c["max_abs_diff"] - 0.001) < 1e-9 and c["val_max_rel_diff"] == 0
    assert compare_curves(ref, other, 0, 3)["missing_steps"] == [1]
