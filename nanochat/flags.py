"""
The trainer's flags (build_arg_parser, nanochat's names) and their checks that need no data, model or device
(validate_args). scripts/base_train.py parses them and calls nanochat.train.train().
"""

import argparse
import os
import shlex

from nanochat.common import UserError


DEFAULT_DEPTH = 20
# 2 CPU cores train about 40 GFLOP/s (make train's d4 run: ~3,400 tokens/s), so a model of 50M parameters
# sees ~100 tokens/s: the GPU-sized defaults (d20, about 400M parameters, 12 tokens each) would run for years.
CPU_MAX_DEFAULT_PARAMS = 50_000_000
# val bpb tokens when --eval-tokens is not given: on GPU 20 batches of 524,288; on CPU a d4 model evaluates ~10k
# tokens/s on 2 cores, so that would take over 10 minutes, while 256K tokens take under a minute and move bpb by ~0.01
GPU_EVAL_TOKENS = 20 * 524288
CPU_EVAL_TOKENS = 1 << 18
MAKE_TRAIN_FLAGS = ("--depth 4 --aspect-ratio 32 --head-dim 64 --max-seq-len 256 --device-batch-size 16 "
                    "--total-batch-size 4096 --num-iterations 300")

# The flags a resumed run takes from its command line, not from the checkpoint (the resume line lists those
# that differ): the optimizer's moments are the checkpoint's, its learning rates and schedule are these.
RESUME_HYPERPARAMETERS = ("embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "warmup_steps",
                          "warmdown_ratio", "final_lr_frac", "num_iterations", "target_flops",
                          "target_param_data_ratio", "device_batch_size", "total_batch_size")


def build_arg_parser():
    p = argparse.ArgumentParser(description="Pretrain a nanochat-style GPT (dense, 2:4 sparse MLPs, fp8)",
                                allow_abbrev=False)
    p.add_argument("--run", type=str, default="dummy",
                   help="wandb run name ('dummy' = no wandb; without wandb installed or logged in: one warning, no logging)")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    # model
    p.add_argument("--depth", type=int, default=None,
                   help=f"number of transformer layers (default {DEFAULT_DEPTH}; on CPU a default-sized model of "
                        f"over {CPU_MAX_DEFAULT_PARAMS // 10**6}M parameters stops with an error unless --depth is given)")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio (rounded up to head dim)")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    # batch and horizon
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per micro-batch per process")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all processes (-1 = one micro-batch per process)")
    p.add_argument("--num-iterations", type=int, default=-1,
                   help="optimizer steps of the whole run, >= 1 (-1 = from --target-flops or --target-param-data-ratio); "
                        "on resume it must be past the saved step")
    p.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1 = off)")
    p.add_argument("--target-param-data-ratio", type=float, default=12, help="tokens = ratio * params (Chinchilla ~20)")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW lr for the token embedding")
    p.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr for lm_head")
    p.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr for the transformer's matrices")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay for the Muon matrices")
    p.add_argument("--warmup-steps", type=int, default=40, help="linear lr warmup steps")
    p.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps of linear lr warmdown at the end")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="lr multiplier at the last step")
    # evaluation, sampling, checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = only at the end, 0 = never)")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help=f"tokens per val bpb evaluation, >= 1, rounded down to whole micro-batches (at least one) "
                        f"(default {GPU_EVAL_TOKENS:,}, on CPU {CPU_EVAL_TOKENS:,}); turn evaluation off with --eval-every 0")
    p.add_argument("--core-metric-every", type=int, default=0,
                   help="CORE metric (DCLM eval bundle) every N steps (-1 = only at the end, 0 = never)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
    p.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps (-1 = only at the end, 0 = never)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end, 0 = never); SIGINT/SIGTERM save the step they stop at unless 0")
    p.add_argument("--keep-last-k", type=int, default=3,
                   help="keep the newest K checkpoints of the run, deleting older ones once a newer one is complete "
                        "(the final one, the one with the best val bpb and the last one before a collapse are always "
                        "kept; 0 = keep all)")
    p.add_argument("--resume-from-step", type=resume_step, default=-1,
                   help="resume from this saved step, or 'latest' for the newest one whose files match their sha256 (-1 = fresh run)")
    p.add_argument("--allow-batch-change", action="store_true",
                   help="resume with another --device-batch-size/--total-batch-size: the data continues from the saved "
                        "position, but the run no longer matches an uninterrupted one")
    p.add_argument("--collapse-steps", type=int, default=5,
                   help="stop, before saving, once the smoothed train loss has stayed --collapse-rise above its best, or "
                        "(after warmup) within --collapse-margin of ln(vocab), for N steps in a row (0 = never)")
    p.add_argument("--collapse-rise", type=float, default=1.5, help="nats above the best smoothed loss that count as collapsed")
    p.add_argument("--collapse-margin", type=float, default=0.1,
                   help="nats below ln(vocab), the loss of predicting every token equally likely, that count as collapsed")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run may write into a --model-tag that holds checkpoints; they are deleted once "
                        "this run saves its first checkpoint")
    p.add_argument("--model-tag", type=str, default="", help="checkpoint directory name (default d<depth>)")
    p.add_argument("--events", type=str, default="",
                   help="the run's events file, one JSON line per step (nanochat/metrics.py: EventLog; "
                        "default <checkpoint dir>/events.jsonl; a fresh run replaces it, a resumed one appends)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off elsewhere)")
    p.add_argument("--recompute", choices=["auto", "on", "off"], default="auto",
                   help="let torch.compile recompute cheap elementwise activations in backward instead of keeping "
                        "them (about a third less activation memory, ~1-2%% slower); auto = on where the predicted "
                        "peak exceeds 80%% of the GPU's memory (d26 at device batch 16 on an 80 GB H100)")
    # sparsity and fp8
    p.add_argument("--sparse", action="store_true", help="2:4 semi-structured sparse MLP layers (c_fc, c_proj)")
    p.add_argument("--sparse-backend", type=str, default="auto", choices=["auto", "cusparselt", "masked"],
                   help="auto = fastest correct kernel; cusparselt = 2:4 GEMMs; masked = dense GEMM on the masked weight (any device)")
    p.add_argument("--fp8", action="store_true", help="fp8 training of the linear layers (compute capability >= 8.9)")
    p.add_argument("--fp8-layers", type=str, default="auto", choices=["auto", "all"],
                   help="with --fp8: auto = a layer shape stays bf16 where its fp8 forward + backward timed more than 10%% "
                        "slower than bf16 at this micro-batch's token count (the log lists each shape); all = every eligible layer")
    return p


def strip_separator(argv):
    """A script's flags without a leading `--`: the separator ends torchrun's own flags
    (`torchrun ... -m scripts.base_train -- --depth=26`), and some Python versions' torchrun pass it on."""
    return argv[1:] if argv[:1] == ["--"] else argv


def resume_step(text):
    """--resume-from-step: a step number or 'latest'."""
    if text == "latest":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number or 'latest', got {text!r}")


def validate_args(args):
    """Flag checks that need no data, model or device. Each failure is one line naming the flag."""
    depth = DEFAULT_DEPTH if args.depth is None else args.depth
    checks = [
        (depth >= 1, f"--depth must be >= 1 (got {depth})"),
        (args.max_seq_len >= 1, f"--max-seq-len must be >= 1 (got {args.max_seq_len})"),
        (args.device_batch_size >= 1, f"--device-batch-size must be >= 1 (got {args.device_batch_size})"),
        (args.head_dim >= 2 and args.head_dim % 2 == 0, f"--head-dim must be even and >= 2 (got {args.head_dim})"),
        (args.aspect_ratio >= 1, f"--aspect-ratio must be >= 1 (got {args.aspect_ratio})"),
        (args.total_batch_size == -1 or args.total_batch_size >= 1,
         f"--total-batch-size must be >= 1, or -1 for one micro-batch per process (got {args.total_batch_size})"),
        (args.num_iterations == -1 or args.num_iterations >= 1,
         f"--num-iterations must be >= 1, or -1 for the horizon from --target-flops/--target-param-data-ratio "
         f"(got {args.num_iterations})"),
        (args.resume_from_step == "latest" or args.resume_from_step >= -1,
         f"--resume-from-step must be a saved step, or -1 for a fresh run (got {args.resume_from_step})"),
        (args.collapse_steps >= 0, f"--collapse-steps must be >= 1, or 0 to never stop a collapsed run "
                                   f"(got {args.collapse_steps})"),
        (args.collapse_rise > 0, f"--collapse-rise must be > 0 (got {args.collapse_rise})"),
        (args.collapse_margin >= 0, f"--collapse-margin must be >= 0 (got {args.collapse_margin})"),
        (not (args.overwrite and args.resume_from_step != -1),
         "--overwrite is for a fresh run replacing a tag's checkpoints; drop it to resume"),
        (args.eval_tokens is None or args.eval_tokens >= 1 or args.eval_every == 0,
         f"--eval-tokens must be >= 1 (got {args.eval_tokens}); to turn evaluation off use --eval-every 0"),
        (args.keep_last_k >= 0, f"--keep-last-k must be >= 0, 0 keeps every checkpoint (got {args.keep_last_k})"),
        (args.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {args.warmup_steps})"),
        (0 <= args.warmdown_ratio <= 1, f"--warmdown-ratio must be in [0, 1] (got {args.warmdown_ratio})"),
        (args.final_lr_frac >= 0, f"--final-lr-frac must be >= 0 (got {args.final_lr_frac})"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0 (got {args.weight_decay})"),
    ]
    for flag in ("embedding_lr", "unembedding_lr", "matrix_lr"):
        checks.append((getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})"))
    for flag in ("eval_every", "sample_every", "save_every"):
        checks.append((getattr(args, flag) >= -1,
                       f"--{flag.replace('_', '-')} must be N >= 1, -1 (only at the end) or 0 (never) "
                       f"(got {getattr(args, flag)})"))
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def resume_command(args, step, world_size):
    """The command that resumes this run from `step`: every flag that differs from its default, as typed."""
    words = []
    for action in build_arg_parser()._actions:
        value = getattr(args, action.dest, None)
        if (not action.option_strings or action.default == argparse.SUPPRESS or value == action.default
                or action.dest in ("resume_from_step", "overwrite")):
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            words.append(flag)
        else:
            words += [flag, str(value)]
    words += ["--resume-from-step", str(step)]
    if world_size == 1:
        launcher = "python -m scripts.base_train"
    elif int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) == world_size:
        launcher = f"torchrun --standalone --nproc_per_node={world_size} -m scripts.base_train --"
    else:
        launcher = "torchrun <this run's launch flags> -m scripts.base_train --"
    return f"{launcher} {shlex.join(words)}"
