"""The trainer's events file (nanochat/metrics.py: EventLog): one start event with the run's set-up, one JSON
line per optimizer step with the documented fields, the val evaluations; a resumed run appends its own."""

import pytest

from nanochat.flags import build_arg_parser
from nanochat.metrics import SetupLog, read_events
from nanochat.train import train
from tests.test_train import TINY

STEP_FIELDS = {"event", "time", "step", "loss", "smooth_loss", "lrm", "dt", "tok_per_sec", "mfu", "peak_memory_gib"}


def test_a_tiny_run_writes_one_event_per_step(tiny_data_dir, tiny_tokenizer, tmp_path):
    path = tmp_path / "run" / "events.jsonl"
    flags = TINY + ["--num-iterations", "6", "--eval-every", "3", "--save-every", "3", "--model-tag", "events",
                    "--events", str(path)]
    out = train(build_arg_parser().parse_args(flags))
    events = read_events(path)
    assert [e["event"] for e in events] == ["start", "val", "step", "step", "step", "val", "step", "step", "step", "val"]
    start = events[0]
    assert (start["step"], start["world_size"], start["device"], start["micro_batches"]) == (0, 1, "cpu", 2)
    assert (start["total_batch_size"], start["num_iterations"], start["args"]["depth"]) == (256, 6, 2)
    assert start["num_params"] == out["summary"]["num_params"] and start["model_config"]["n_layer"] == 2
    assert start["converter"] == {"sparse": False, "fp8": False} and start["plan"] == {} and start["kernel_choices"] == []
    steps = read_events(path, "step")
    assert all(set(e) == STEP_FIELDS for e in steps)
    assert [e["step"] for e in steps] == out["history"]["step"] == [1, 2, 3, 4, 5, 6]
    assert [e["loss"] for e in steps] == out["history"]["loss"]
    assert [e["tok_per_sec"] for e in steps] == out["history"]["tok_per_sec"]
    assert all(e["dt"] > 0 and e["peak_memory_gib"] > 0 and e["mfu"] is None for e in steps)  # CPU: no peak FLOPs
    assert [(e["step"], e["val_bpb"]) for e in read_events(path, "val")] == \
        list(zip(out["history"]["val_step"], out["history"]["val_bpb"]))

    resumed = train(build_arg_parser().parse_args(flags + ["--resume-from-step", "3"]))
    again = read_events(path)[len(events):]  # appended after the first run's events
    assert again[0]["event"] == "start" and again[0]["step"] == 3
    assert [e["loss"] for e in again if e["event"] == "step"] == resumed["history"]["loss"] == out["history"]["loss"][3:]


def test_cpu_warnings_reach_the_start_event(tiny_data_dir, tiny_tokenizer, nanochat_base_dir):
    import os
    train(build_arg_parser().parse_args(TINY + ["--num-iterations", "1", "--model-tag", "events_cpu", "--sparse",
                                                "--eval-every", "0"]))
    (start,) = read_events(os.path.join(nanochat_base_dir, "base_checkpoints", "events_cpu", "events.jsonl"), "start")
    assert start["warnings"] == ["Warning: 2:4 sparsity requires CUDA, ignoring --sparse flag"]
    assert start["converter"]["sparse_layers"] == 0 and start["plan"] == {}


def test_kernel_choices_are_the_converters_choice_lines():
    lines = [
        "2:4 kernels for 12 layers of weight 3072x768 (c_fc) at T=32768: fwd dense (sparse 0.180 ms, dense 0.214 ms)",
        "2:4 kernels: cusparselt: 24 layers (3072x768, 768x3072)",
        "fp8 2:4 kernels for 26 layers of weight 6656x1664 (c_fc): fwd 2:4, dgrad 2:4",
        "fp8: 104 layers of weight 1664x1664 (c_k,c_proj,c_q,c_v) in fp8: forward + backward 0.806 ms in fp8",
        "fp8: converted 156 Linear layers to float8 (tensorwise scaling)",
        "2:4 GEMMs off: --sparse trains the 2:4-pruned MLP weights with dense GEMMs at dense speed; no whole-step run"]
    printed = []
    log = SetupLog(printed.append)
    for line in lines:
        log(line)
    assert printed == lines  # every line still reaches the console
    assert log.kernel_choices() == [lines[i] for i in (0, 2, 3, 5)]


def test_an_unwritable_events_path_is_one_clear_error(tmp_path):
    from nanochat.common import UserError
    from nanochat.metrics import EventLog
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the events file .*--events"):
        EventLog(str(blocker / "events.jsonl"))
