"""
Whether `--sparse` runs its 2:4 GEMMs at all: decided from whole training steps, not from kernel timings.

The 2:4 MLP block alone runs 1.18x faster than dense at the power cap, at the same clock, yet whole --sparse
steps held a lower SM clock than dense ones and ended at 0.96-1.03x of dense (docs/measuring.md). A kernel's
burst timing cannot tell whether 2:4 pays in a run, so `--sparse-backend auto` uses cuSPARSELt only where a run
of the trainer, one process per mode, measured --sparse faster than dense by more than the run-to-run spread,
at this size or a smaller one: a wider model, more tokens per micro-batch and more micro-batches per step each
give the 2:4 GEMMs more to save against the same per-step costs (the records below rise with each). Elsewhere
--sparse trains the same pruned model with dense GEMMs on the masked weight, at dense speed.

A new record (benchmarks/results/, `bash benchmarks/gpu.sh train --method process ...`) becomes a row here;
tests/test_step_gate.py checks every row against its record's JSON.
"""

from dataclasses import dataclass

PAYS_ABOVE = 1.02  # repeated one-process-per-mode runs of one mode spread by about +-1%


@dataclass(frozen=True)
class StepRecord:
    gpu: str             # torch.cuda.get_device_name()
    precision: str       # "bf16": --sparse against dense; "fp8": --fp8 --sparse against --fp8
    width: int           # model dim (the MLP layers are width x 4*width)
    tokens: int          # tokens per micro-batch (device batch x sequence length)
    micro_batches: int   # micro-batches per optimizer step
    ratio: float         # tok/s of the sparse mode over its dense baseline
    record: str          # benchmarks/results/<record>.md


STEP_RECORDS = (
    StepRecord("NVIDIA H200", "bf16", 768, 32768, 1, 0.964, "train_d12_process_h200"),
    StepRecord("NVIDIA H200", "bf16", 768, 32768, 4, 0.985, "train_d12_process_h200"),
    StepRecord("NVIDIA H200", "bf16", 1280, 32768, 1, 0.982, "train_d20_mb1_process_h200"),
    StepRecord("NVIDIA H200", "bf16", 1280, 32768, 4, 1.009, "train_d20_mb4_process_h200"),
    StepRecord("NVIDIA H200", "bf16", 1664, 32768, 1, 1.001, "train_d26_mb1_process_h200"),
    StepRecord("NVIDIA H200", "bf16", 1664, 32768, 4, 1.031, "train_d26_mb4_process_h200"),
    StepRecord("NVIDIA H200", "fp8", 1664, 32768, 4, 0.991, "train_d26_mb4_fp8_process_h200"),
)


def _size(r):
    return f"width {r.width}, {r.tokens} tokens x {r.micro_batches} micro-batches"


def sparse_step_pays(gpu, precision, width, tokens, micro_batches, records=STEP_RECORDS):
    """(pays, line): whether a whole-step record on this GPU and precision, at this size or a smaller one
    (width, tokens per micro-batch and micro-batches each <= this run's), measured 2:4 faster than
    PAYS_ABOVE; the line says which record decided, or why none did."""
    mine = [r for r in records if r.gpu == gpu and r.precision == precision]
    smaller = [r for r in mine if r.width <= width and r.tokens <= tokens and r.micro_batches <= micro_batches]
    paying = [r for r in smaller if r.ratio >= PAYS_ABOVE]
    if paying:
        r = max(paying, key=lambda r: r.ratio)
        return True, (f"2:4 GEMMs on: a whole-step run at {_size(r)} on {gpu} measured {r.ratio:.3f}x of dense "
                      f"(benchmarks/results/{r.record}.md)")
    run = f"{width}, {tokens} tokens x {micro_batches} micro-batches"
    if smaller:
        r = max(smaller, key=lambda r: (r.width, r.micro_batches, r.tokens))
        why = (f"the nearest whole-step run at this size or smaller ({_size(r)}) measured {r.ratio:.3f}x of dense "
               f"(benchmarks/results/{r.record}.md)")
    elif mine:
        why = f"no whole-step run on {gpu} at width <= {run} measured 2:4 ({precision})"
    else:
        why = f"no whole-step run on {gpu} measured 2:4 ({precision})"
    return False, (f"2:4 GEMMs off: --sparse trains the 2:4-pruned MLP weights with dense GEMMs at dense speed; {why}. "
                   f"--sparse-backend cusparselt forces the 2:4 GEMMs")
