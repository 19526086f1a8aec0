"""benchmarks/bench_train.py reads the trainer's step lines when a run stops after training (a timeout
in the final eval, or --from-logs): those numbers must be the ones the trainer's own summary reports."""

import pytest

from benchmarks.bench_train import steady_from_log
from nanochat.train import build_arg_parser, train
from tests.test_train import TINY


def test_steady_from_log_matches_the_trainer_summary(tiny_data_dir, tiny_tokenizer, capsys):
    out = train(build_arg_parser().parse_args(TINY + ["--num-iterations", "13", "--model-tag", "benchlog"]))
    parsed = steady_from_log(capsys.readouterr().out)
    s = out["summary"]
    assert parsed["steps_logged"] == 13
    assert parsed["tok_per_sec_mean"] == pytest.approx(s["tok_per_sec"], rel=1e-3, abs=1.0)  # the log rounds to 1 tok/s
    steady = sorted(out["history"]["tok_per_sec"][10:])
    assert parsed["tok_per_sec"] == pytest.approx(steady[1], rel=1e-3, abs=1.0)  # the median of the 3 steady steps
    assert parsed["mfu"] is None  # CPU: no peak FLOPs, the log prints "-"


def test_steady_from_log_needs_a_step_past_warmup():
    line = "step {:05d}/00014 | loss 5.0 (smooth 5.0) | lrm 1.000 | dt 950ms | tok/s 68,000 | mfu 45.5% | mem 43.44GiB | eta 0.1m\n"
    assert steady_from_log("".join(line.format(i) for i in range(1, 11))) is None
    r = steady_from_log("".join(line.format(i) for i in range(1, 13)))
    assert (r["tok_per_sec"], r["step_time_ms"], r["mfu"], r["peak_memory_gib"]) == (68000, 950, 45.5, 43.44)
