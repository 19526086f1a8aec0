"""
The pretraining loop. `scripts/base_train.py` parses the flags and calls train(). Top to bottom:
flags and their checks; the collapse guard; set-up (model, the --sparse/--fp8 converters (nanochat/accel/converters.py),
optimizers, resume, DDP, compile) and the Checkpointer (lock, storage checks, saves); train_step(), one
optimizer step over the micro-batches; the actions between steps (val bpb, CORE, samples); Metrics (log
lines, history, wandb, summary); and train() with loop(), the loop.
"""

import argparse
import math
import os
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import checkpoint, storage
from nanochat.accel.converters import Converters, Fp8Converter, SparseConverter
from nanochat.accel.kernel_choice import CACHE_FILE, TimingCache
from nanochat.common import (UserError, autodetect_device_type, compute_cleanup, compute_init, get_base_dir,
                             gpu_peak_flops, print0)
from nanochat.evaluation import evaluate_bpb, sample_text
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import lr_multiplier, muon_momentum, setup_optimizers

DEFAULT_DEPTH = 20
# 2 CPU cores train about 40 GFLOP/s (make train's d4 run: ~3,400 tokens/s), so a model of 50M parameters
# sees ~100 tokens/s: the GPU-sized defaults (d20, about 400M parameters, 12 tokens each) would run for years.
CPU_MAX_DEFAULT_PARAMS = 50_000_000
MAKE_TRAIN_FLAGS = ("--depth 4 --aspect-ratio 32 --head-dim 64 --max-seq-len 256 --device-batch-size 16 "
                    "--total-batch-size 4096 --num-iterations 300")


def build_arg_parser():
    p = argparse.ArgumentParser(description="Pretrain a nanochat-style GPT (dense, 2:4 sparse MLPs, fp8)",
                                allow_abbrev=False)
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' = no wandb)")
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
    p.add_argument("--scalar-lr", type=float, default=0.5, help="lr for scalar parameters (this model has none; kept for nanochat compatibility)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay for the Muon matrices")
    p.add_argument("--warmup-steps", type=int, default=40, help="linear lr warmup steps")
    p.add_argument("--warmdown-ratio", type=float, default=0.65, help="fraction of steps of linear lr warmdown at the end")
    p.add_argument("--final-lr-frac", type=float, default=0.05, help="lr multiplier at the last step")
    # evaluation, sampling, checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (-1 = only at the end, 0 = never)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288,
                   help="tokens per val bpb evaluation, >= 1, rounded down to whole micro-batches (at least one); "
                        "turn evaluation off with --eval-every 0")
    p.add_argument("--core-metric-every", type=int, default=0,
                   help="CORE metric (DCLM eval bundle) every N steps (-1 = only at the end, 0 = never)")
    p.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1 = all)")
    p.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps (-1 = only at the end, 0 = never)")
    p.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end, 0 = never)")
    p.add_argument("--keep-last-k", type=int, default=3,
                   help="keep the newest K checkpoints of the run, deleting older ones once a newer one is complete "
                        "(the final one, the one with the best val bpb and the last one before a collapse are always "
                        "kept; 0 = keep all)")
    p.add_argument("--resume-from-step", type=resume_step, default=-1,
                   help="resume from this saved step, or 'latest' for the newest one with complete files (-1 = fresh run)")
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
        (args.eval_tokens >= 1 or args.eval_every == 0,
         f"--eval-tokens must be >= 1 (got {args.eval_tokens}); to turn evaluation off use --eval-every 0"),
        (args.keep_last_k >= 0, f"--keep-last-k must be >= 0, 0 keeps every checkpoint (got {args.keep_last_k})"),
        (args.warmup_steps >= 0, f"--warmup-steps must be >= 0 (got {args.warmup_steps})"),
        (0 <= args.warmdown_ratio <= 1, f"--warmdown-ratio must be in [0, 1] (got {args.warmdown_ratio})"),
        (args.final_lr_frac >= 0, f"--final-lr-frac must be >= 0 (got {args.final_lr_frac})"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0 (got {args.weight_decay})"),
    ]
    for flag in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr"):
        checks.append((getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})"))
    for flag in ("eval_every", "sample_every", "save_every"):
        checks.append((getattr(args, flag) >= -1,
                       f"--{flag.replace('_', '-')} must be N >= 1, -1 (only at the end) or 0 (never) "
                       f"(got {getattr(args, flag)})"))
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def diverged(what, step, last_saved):
    kept = f"the newest checkpoint is step {last_saved} (--resume-from-step {last_saved})" \
        if last_saved is not None else "no checkpoint was saved"
    return UserError(f"training diverged at step {step} ({what}) and nothing of that step was saved; {kept}; "
                     f"lower the learning rates (--matrix-lr, --embedding-lr)")


class CollapseGuard:
    """Stops a run whose loss stayed finite but means nothing any more: for --collapse-steps steps in a row
    the smoothed train loss is --collapse-rise nats above its best so far, or, after warmup, within
    --collapse-margin of ln(vocab), the loss of predicting every token equally likely (where a fresh model
    starts, hence not during warmup). `began` is the first step of the current streak: the checkpointer keeps
    the newest checkpoint saved before it."""

    def __init__(self, args, vocab_size):
        self.steps, self.rise, self.margin = args.collapse_steps, args.collapse_rise, args.collapse_margin
        self.warmup_steps = args.warmup_steps
        self.uniform = math.log(vocab_size)
        self.best = math.inf
        self.began = None

    def update(self, step, smooth_loss):
        """After step `step`: None, or why the run has collapsed."""
        if self.steps == 0:
            return None
        self.best = min(self.best, smooth_loss)
        if smooth_loss > self.best + self.rise:
            why = f"more than {self.rise} nats above its best ({self.best:.4f})"
        elif step > self.warmup_steps and smooth_loss > self.uniform - self.margin:
            why = f"within {self.margin} of ln(vocab) = {self.uniform:.4f}, the loss of uniform guessing"
        else:
            self.began = None
            return None
        self.began = self.began or step
        if step - self.began + 1 < self.steps:
            return None
        return f"the smoothed loss {smooth_loss:.4f} has stayed {why} for {self.steps} steps (since step {self.began})"


def collapsed(why, step, good_step):
    kept = f"the newest checkpoint from before the collapse is step {good_step} (--resume-from-step {good_step})" \
        if good_step is not None else "no checkpoint from before the collapse was saved"
    return UserError(f"training collapsed at step {step} though the loss is finite: {why}; step {step} was not saved; "
                     f"{kept}; lower the learning rates (--matrix-lr, --embedding-lr, --unembedding-lr), or tune "
                     f"--collapse-steps/--collapse-rise/--collapse-margin")


def check_cpu_size(config, depth_given):
    """On CPU the GPU-sized default model would train for years: stop unless the size was asked for."""
    with torch.device("meta"):  # count parameters without allocating them
        num_params = GPT(config).num_params()
    if num_params <= CPU_MAX_DEFAULT_PARAMS:
        return
    if not depth_given:
        raise UserError(f"the default model (depth {config.n_layer}, {num_params / 1e6:.0f}M parameters) is far too large "
                        f"to train on CPU: use `make train`'s settings ({MAKE_TRAIN_FLAGS}), --device-type cuda on a GPU, "
                        f"or pass --depth {config.n_layer} to run it anyway")
    print0(f"Warning: {num_params / 1e6:.0f}M parameters on CPU will train very slowly")


def check_fresh_run(args, checkpoint_dir):
    """A fresh run that saves checkpoints must not silently replace another run's. Returns the steps that
    --overwrite replaces (deleted once this run's first checkpoint is complete)."""
    if args.resume_from_step >= 0 or args.save_every == 0:
        return []
    steps = checkpoint.saved_steps(checkpoint_dir)
    if steps and not args.overwrite:
        raise UserError(f"{checkpoint_dir} already holds checkpoints of another run (steps {', '.join(map(str, steps))}): "
                        f"continue it with --resume-from-step {steps[-1]}, replace it with --overwrite, "
                        f"or pick a new --model-tag")
    return steps


def resolve_num_iterations(args, flops_per_token, num_params, total_batch_size):
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * total_batch_size)))
    if args.target_param_data_ratio > 0:
        return max(1, round(args.target_param_data_ratio * num_params / total_batch_size))
    raise UserError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB: host RSS


# -----------------------------------------------------------------------------
# Set-up: the model, its converters (sparse, fp8), optimizers, resume, DDP and compile

def build_model(args, depth_given, vocab_size, device, device_type):
    """The dense GPT, initialized. Returns (model, params, FLOPs per token), both counted on the plain
    dense model, before any sparse or fp8 swap."""
    config = config_from_depth(args.depth, vocab_size, args.max_seq_len, args.aspect_ratio, args.head_dim)
    if device_type == "cpu":
        check_cpu_size(config, depth_given)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    num_params = model.num_params()
    flops_per_token = model.estimate_flops()
    print0(f"model: depth {config.n_layer}, dim {config.n_embd}, heads {config.n_head}, vocab {config.vocab_size}, "
           f"{num_params:,} params, {flops_per_token:.3e} FLOPs/token")
    return model, num_params, flops_per_token


def plan_batches(args, world_size, flops_per_token, num_params):
    """Returns (tokens per micro-batch over all processes, tokens per optimizer step, micro-batches per step,
    optimizer steps of the run)."""
    tokens_per_micro_batch = args.device_batch_size * args.max_seq_len * world_size
    total_batch_size = tokens_per_micro_batch if args.total_batch_size == -1 else args.total_batch_size
    if total_batch_size <= 0 or total_batch_size % tokens_per_micro_batch != 0:
        raise UserError(f"--total-batch-size {total_batch_size} is not a multiple of device batch x seq len x processes = "
                        f"{args.device_batch_size} x {args.max_seq_len} x {world_size} = {tokens_per_micro_batch}: "
                        f"use a multiple of {tokens_per_micro_batch} or change --device-batch-size")
    grad_accum_steps = total_batch_size // tokens_per_micro_batch
    num_iterations = resolve_num_iterations(args, flops_per_token, num_params, total_batch_size)
    print0(f"batch: {total_batch_size:,} tokens/step = {grad_accum_steps} accumulation x {tokens_per_micro_batch:,}; "
           f"{num_iterations} steps, {num_iterations * total_batch_size:,} tokens")
    return tokens_per_micro_batch, total_batch_size, grad_accum_steps, num_iterations


def build_converters(args, device, grad_accum_steps):
    """The run's model converters from --sparse and --fp8 (Converters fixes their order). Kernels and fp8
    layers are chosen for this micro-batch's token count; the sparse ones weigh their saving over the
    step's micro-batches against one re-pack per step. Both read and extend one timing cache in the base dir
    (nanochat/accel/kernel_choice.py)."""
    tokens = args.device_batch_size * args.max_seq_len
    cache = TimingCache(os.path.join(get_base_dir(), CACHE_FILE), log=print0) if (args.sparse or args.fp8) else None
    return Converters([
        SparseConverter(device, backend=args.sparse_backend, fp8=args.fp8, tokens=tokens,
                        micro_batches=grad_accum_steps, timing_cache=cache, log=print0) if args.sparse else None,
        Fp8Converter(device, tokens=tokens if args.fp8_layers == "auto" else None, timing_cache=cache,
                     log=print0) if args.fp8 else None,
    ])


class Checkpointer:
    """The run's checkpoint directory: lock it for this run, check it can take the checkpoints, resume from it,
    save to it (never weights that are not finite; a full or failing disk stops the run with one line), keep the
    newest --keep-last-k plus the last good and the best-val-bpb ones, and delete what --overwrite replaces once
    this run's first save is complete. close() releases the lock; train() calls it on every exit."""

    def __init__(self, args, checkpoint_dir, run_meta, rank, checkpoint_bytes, num_iterations):
        self.dir = checkpoint_dir
        self.run_meta = run_meta
        self.rank = rank
        self.keep_last_k = args.keep_last_k
        self.overwrite = args.overwrite
        self.lock = None
        if rank == 0:
            self.lock = storage.RunLock(checkpoint_dir, print0)
        try:
            self.replaced_steps = check_fresh_run(args, checkpoint_dir)
            if rank == 0:
                storage.remove_stale_temps(checkpoint_dir, print0)
                count = self.count_needed(args, num_iterations)
                storage.check_writable(checkpoint_dir, count * checkpoint_bytes, "checkpoint directory",
                                       f" for {count} checkpoints of ~{checkpoint_bytes:,} bytes")
        except BaseException:
            self.close()
            raise
        self.last_saved = None  # the newest step saved by this run or resumed from, for the divergence message

    def count_needed(self, args, num_iterations):
        """Checkpoints on disk at once: the kept ones and the one being written."""
        if args.save_every == 0:
            return 0
        start = args.resume_from_step if args.resume_from_step > 0 else 0
        saves = (num_iterations - start) // args.save_every + 1 if args.save_every > 0 else 1
        return saves if self.keep_last_k == 0 else min(saves, self.keep_last_k + 1)

    def close(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def resume(self, args, model, optimizers, num_iterations, world_size, device):
        """Loads weights, optimizer moments and RNG states of --resume-from-step.
        Returns (step, loop state, this rank's loader state)."""
        meta = checkpoint.load_meta(self.dir, args.resume_from_step)
        checkpoint.check_compatible(meta, model.config.to_dict(), world_size)
        checkpoint.check_batch(meta, args.device_batch_size, self.run_meta["total_batch_size"], world_size,
                               args.allow_batch_change)
        if meta["step"] >= num_iterations:
            horizon = f"--num-iterations {num_iterations}" if args.num_iterations > 0 else \
                "from --target-flops/--target-param-data-ratio"
            raise UserError(f"cannot resume from step {meta['step']}: the run ends at step {num_iterations} ({horizon}); "
                            f"pass --num-iterations greater than {meta['step']} to train further")
        model_state, rank_state, meta = checkpoint.load_checkpoint(self.dir, args.resume_from_step, device, self.rank)
        model.load_state_dict(model_state, strict=True)
        for opt, state in zip(optimizers, rank_state["optimizers"]):
            opt.load_state_dict(state)
        checkpoint.set_rng_state(rank_state["rng"])
        self.last_saved = meta["step"]
        print0(f"resumed from {self.dir} at step {meta['step']}")
        return meta["step"], meta.get("loop_state", {}), rank_state["loader"]

    def good_step(self, collapse_began):
        """The newest saved step from before a collapse that began at step collapse_began (None: no collapse)."""
        if collapse_began is None:
            return None
        before = [s for s in checkpoint.saved_steps(self.dir) if s < collapse_began and s not in self.replaced_steps]
        return before[-1] if before else None

    def save(self, step, model, optimizers, loader_state, loop_state, log, val_bpb=None, collapse_began=None):
        """val_bpb: measured at this step (recorded in the meta, for the best-val-bpb checkpoint that pruning keeps).
        collapse_began: the first step of a streak of collapsed losses, whose last good checkpoint pruning keeps."""
        # a finite loss can still come with a non-finite update: never save (and keep-last-k never
        # prunes good checkpoints for) weights that are not finite; DDP replicas agree, so all ranks stop
        if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
            raise diverged("the weights are not finite", step, self.last_saved)
        try:
            checkpoint.save_checkpoint(self.dir, step, model.state_dict(), [o.state_dict() for o in optimizers],
                                       loader_state, dict(self.run_meta, loop_state=loop_state, val_bpb=val_bpb),
                                       self.rank)
        except Exception as e:
            err = storage.disk_error(e)
            if err is None:
                raise
            storage.remove_own_temps(self.dir)
            if self.rank == 0:
                checkpoint.remove_unsaved(self.dir, step)
            kept = f"the earlier checkpoints are intact (newest: step {self.last_saved}, --resume-from-step " \
                   f"{self.last_saved})" if self.last_saved is not None else "no checkpoint of this run was saved"
            raise UserError(f"saving checkpoint step {step} to {self.dir} failed ({err.strerror}; "
                            f"{storage.free_bytes(self.dir):,} bytes free there): {kept}; free space or fix the disk")
        log(f"saved checkpoint step {step} to {self.dir}")
        self.last_saved = step
        if self.rank == 0:
            mine = [s for s in checkpoint.saved_steps(self.dir) if s not in self.replaced_steps]
            protect = {s for s in (self.good_step(collapse_began), checkpoint.best_val_step(self.dir, mine))
                       if s is not None}
            deleted = checkpoint.prune_checkpoints(self.dir, step, self.keep_last_k, self.replaced_steps, protect)
            self.replaced_steps = []
            if deleted:
                log(f"deleted checkpoint steps {', '.join(map(str, deleted))} (--keep-last-k {self.keep_last_k}"
                    f"{', --overwrite' if self.overwrite else ''})")


# Peak-memory model of a compiled training step, fitted to H100/H200 measurements
# (benchmarks/results/memory_d26_b16_h200.md, docs/memory-notes.md): weights, grads and optimizer moments
# in fp32, and what the compiled forward keeps for backward per token, model dim and layer.
BYTES_PER_PARAM = 12.4
SAVED_BYTES_PER_TOKEN_DIM_LAYER = 46


def predicted_peak_bytes(config, tokens_per_micro_batch, num_params):
    return BYTES_PER_PARAM * num_params + SAVED_BYTES_PER_TOKEN_DIM_LAYER * tokens_per_micro_batch * config.n_embd * config.n_layer


def use_recompute(setting, config, tokens_per_micro_batch, num_params, device):
    """(on, why) for --recompute. auto turns it on only where the run would not fit comfortably: it
    costs ~1-2% tokens/s (the recomputed elementwise ops) and cuts saved activations by about a third."""
    if setting != "auto" or device.type != "cuda":
        return setting == "on", f"--recompute {setting}"
    total = torch.cuda.get_device_properties(device).total_memory
    need = predicted_peak_bytes(config, tokens_per_micro_batch, num_params)
    on = need > 0.8 * total
    return on, f"predicted peak {need / 2**30:.1f} GiB of {total / 2**30:.1f} GiB (auto: on above 80%)"


def wrap_model(model, is_ddp, local_rank, device_type, converters, use_compile, recompute=False):
    """DDP, then compile last. Returns (the model the training forward passes call, the DDP wrapper or None)."""
    train_model, ddp_model = model, None
    if is_ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
        train_model = ddp_model
    converters.after_wrap(model)
    if use_compile and recompute:
        # read by the partitioner when the first step compiles; process-wide, like other compile settings
        import torch._functorch.config as functorch_config
        functorch_config.ban_recompute_materialized_backward = False
    if use_compile:
        train_model = torch.compile(train_model, dynamic=False)
    return train_model, ddp_model


@dataclass
class Run:
    """What set-up built: everything the loop, its actions and the summary read."""
    args: argparse.Namespace  # the flags, with --depth filled in
    device: torch.device
    device_type: str
    rank: int
    world_size: int
    autocast_ctx: object
    sync: object  # waits for the GPU, so that step times measure the work
    tokenizer: object
    token_bytes: torch.Tensor  # (vocab,) UTF-8 bytes of each token, 0 for special tokens
    model: torch.nn.Module  # the plain model: state dicts, eval/train mode, CORE and sampling
    train_model: torch.nn.Module  # the model under DDP and compile: training and val forward passes
    ddp_model: object  # the DDP wrapper (None in one process)
    optimizers: list  # [adamw, muon]
    num_params: int
    flops_per_token: float
    converters: Converters  # --sparse, --fp8
    total_batch_size: int  # tokens per optimizer step, all processes
    grad_accum_steps: int  # micro-batches per optimizer step
    num_iterations: int  # the step the run ends at
    eval_steps: int  # val batches per evaluation
    model_tag: str
    checkpointer: Checkpointer
    start_step: int
    loop_state: dict  # the smoothed loss and train time saved with the resumed checkpoint
    loader: object  # the train loader, at the resumed position
    core_eval: object  # None unless --core-metric-every

    @property
    def master(self):
        return self.rank == 0




def latest_step(checkpoint_dir):
    """--resume-from-step latest: the newest saved step whose files are complete."""
    steps = checkpoint.intact_steps(checkpoint_dir)
    if not steps:
        raise UserError(f"--resume-from-step latest: no checkpoint with complete files in {checkpoint_dir} "
                        f"({checkpoint.existing_tags(checkpoint_dir)}): check --model-tag, or start a fresh run")
    print0(f"--resume-from-step latest: step {steps[-1]}")
    return steps[-1]


def checkpoint_bytes(model, world_size):
    """Bytes of one checkpoint, estimated before anything is saved: the weights, and per rank an optimizer file
    of at most twice the weights (AdamW keeps two moments per parameter, Muon one)."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return weights * (1 + 2 * world_size)


def setup(args):
    """Everything before the first step. Fails on bad flags, data or checkpoints before any training."""
    from nanochat.dataloader import DistributedDataLoader
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    validate_args(args)
    depth_given = args.depth is not None
    args = argparse.Namespace(**{**vars(args), "depth": args.depth if depth_given else DEFAULT_DEPTH})
    core_tasks = None
    if args.core_metric_every != 0:
        from nanochat.core_eval import load_tasks
        core_tasks = load_tasks(max_per_task=args.core_metric_max_per_task)  # a missing bundle fails now, not mid-run
    device_type = args.device_type or autodetect_device_type()
    is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    torch.manual_seed(args.seed)
    if device_type == "cpu":
        torch.set_flush_denormal(True)  # tiny post-init values hit x86's slow denormal path (5x slower steps)

    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    need = None
    if args.resume_from_step == "latest":
        args.resume_from_step = latest_step(checkpoint_dir)
    if args.resume_from_step >= 0:  # the tokenizer the checkpoint was trained with
        need = checkpoint.tokenizer_need(checkpoint.load_meta(checkpoint_dir, args.resume_from_step), checkpoint_dir)
    tokenizer = get_tokenizer(need=need)
    token_bytes = get_token_bytes(device)
    if args.eval_every != 0:
        from nanochat.dataset import list_row_groups
        list_row_groups("val")  # a bad val shard fails now, not at the final eval before the last save
    if rank == 0:
        storage.check_writable(os.path.join(get_base_dir(), "report"), storage.REPORT_BYTES, "report directory")
    model, num_params, flops_per_token = build_model(args, depth_given, tokenizer.get_vocab_size(), device, device_type)
    tokens_per_micro_batch, total_batch_size, grad_accum_steps, num_iterations = \
        plan_batches(args, world_size, flops_per_token, num_params)
    converters = build_converters(args, device, grad_accum_steps)
    converters.convert(model)
    optimizers = setup_optimizers(model, args.embedding_lr, args.unembedding_lr, args.matrix_lr,
                                  args.weight_decay, device_type)
    converters.after_optimizers(model, optimizers)

    run_meta = dict(model_config=model.config.to_dict(), args=vars(args), world_size=world_size,
                    tokenizer=tokenizer.identity(), total_batch_size=total_batch_size, **converters.meta())
    checkpointer = Checkpointer(args, checkpoint_dir, run_meta, rank, checkpoint_bytes(model, world_size), num_iterations)
    try:  # the lock is released on any failure from here on
        start_step, loop_state, loader_state = 0, {}, None
        if args.resume_from_step >= 0:
            start_step, loop_state, loader_state = checkpointer.resume(args, model, optimizers, num_iterations,
                                                                       world_size, device)
        recompute, why = use_recompute(args.recompute, model.config, args.device_batch_size * args.max_seq_len,
                                       num_params, device)
        if use_compile:
            print0(f"activation recompute in backward: {'on' if recompute else 'off'} ({why})")
        train_model, ddp_model = wrap_model(model, is_ddp, local_rank, device_type, converters, use_compile, recompute)

        loader = DistributedDataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device,
                                       rank=rank, world_size=world_size, state=loader_state)
        core_eval = None
        if core_tasks is not None:
            from nanochat.core_eval import CoreEval
            core_eval = CoreEval(core_tasks, tokenizer, model.rotary_seq_len, args.device_batch_size * args.max_seq_len)
    except BaseException:
        checkpointer.close()
        raise

    return Run(args=args, device=device, device_type=device_type, rank=rank, world_size=world_size,
               autocast_ctx=autocast_ctx, sync=torch.cuda.synchronize if device_type == "cuda" else (lambda: None),
               tokenizer=tokenizer, token_bytes=token_bytes, model=model, train_model=train_model, ddp_model=ddp_model,
               optimizers=optimizers, num_params=num_params, flops_per_token=flops_per_token, converters=converters,
               total_batch_size=total_batch_size, grad_accum_steps=grad_accum_steps, num_iterations=num_iterations,
               eval_steps=max(1, args.eval_tokens // tokens_per_micro_batch), model_tag=model_tag,
               checkpointer=checkpointer, start_step=start_step, loop_state=loop_state, loader=loader, core_eval=core_eval)


# -----------------------------------------------------------------------------
# One optimizer step

class TrainBatches:
    """The train loader one batch ahead: the next micro-batch loads while the device runs this one.
    `state` is the loader position before the pending batch (x, y): what a checkpoint stores."""

    def __init__(self, loader):
        self.loader = loader
        self.advance()

    def advance(self):
        self.state = self.loader.state_dict()
        self.x, self.y = self.loader.next_batch()


def apply_schedule(optimizers, step, num_iterations, args):
    """Sets this step's learning rates and Muon momentum; returns the lr multiplier."""
    lrm = lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
    _, muon = optimizers
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(step)
    return lrm


def train_step(run, batches, step):
    """Gradients over the step's micro-batches, then the optimizer step.
    Returns (the loss averaged over micro-batches and processes, the lr multiplier)."""
    step_loss = 0.0
    for micro_step in range(run.grad_accum_steps):
        # DDP all-reduces the gradients once, in the last micro-batch's backward
        last_micro = micro_step == run.grad_accum_steps - 1
        sync_ctx = run.ddp_model.no_sync() if (run.ddp_model is not None and not last_micro) else nullcontext()
        with sync_ctx:
            with run.autocast_ctx:
                loss = run.train_model(batches.x, batches.y)
            (loss / run.grad_accum_steps).backward()
        step_loss += loss.detach()
        batches.advance()
    lrm = apply_schedule(run.optimizers, step, run.num_iterations, run.args)
    for opt in run.optimizers:
        opt.step()
    run.model.zero_grad(set_to_none=True)
    step_loss = step_loss / run.grad_accum_steps
    if dist.is_initialized():
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
    return step_loss.item(), lrm


# -----------------------------------------------------------------------------
# Between steps: when an action is due; val bpb, CORE and samples

def due(every, step, last_step):
    """A --*-every flag: N >= 1 every N steps and at the end, -1 only at the end, 0 never."""
    return (every > 0 and step % every == 0) or (last_step and every != 0)


def validate(run, log):
    """Val bpb on the first --eval-tokens of the val split; under DDP, also checks that the replicas still
    agree (the converters' check: with sparse layers, every rank pruned the same masks)."""
    from nanochat.dataloader import DistributedDataLoader
    args = run.args
    run.model.eval()
    val_loader = DistributedDataLoader(run.tokenizer, args.device_batch_size, args.max_seq_len, "val", run.device,
                                       rank=run.rank, world_size=run.world_size)
    val_bpb = evaluate_bpb(run.train_model, val_loader, run.eval_steps, run.token_bytes, run.autocast_ctx)
    run.model.train()
    run.converters.check_replicas(run.model, log)
    return val_bpb


def core_metric(run):
    """CORE on the bundle's tasks: every rank scores its share, with the eager model (the example shapes vary)."""
    run.model.eval()
    with run.autocast_ctx, run.converters.eager(run.model):
        core = run.core_eval.evaluate(run.model, run.device)
    run.model.train()
    return core


def sample(run):
    """Greedy continuations of SAMPLE_PROMPTS."""
    run.model.eval()
    with run.autocast_ctx, run.converters.eager(run.model):  # fp8 layers sample in bf16 (one token at a time)
        samples = sample_text(run.model, run.tokenizer)
    run.model.train()
    return samples


# -----------------------------------------------------------------------------
# Metrics: the log lines, history, progress bar, wandb and the summary

class Metrics:
    """Where the run's numbers go: the log (through the progress bar on a terminal), the history that train()
    returns, and wandb. Holds the smoothed loss and train time (continued on resume) and the latest val bpb,
    CORE and samples, for checkpoints and the summary."""

    def __init__(self, run):
        args = run.args
        self.run = run
        self.peak_flops = gpu_peak_flops(run.device)
        self.wandb_run = None
        if args.run != "dummy" and run.master:
            try:
                import wandb
            except ImportError:
                raise UserError("--run names a wandb run but wandb is not installed: pip install wandb, or use --run dummy")
            self.wandb_run = wandb.init(project="nanochat-sparse", name=args.run, config=vars(args))
        self.history = dict(step=[], loss=[], val_step=[], val_bpb=[], core_step=[], core_metric=[], tok_per_sec=[], mfu=[])
        self.smooth_loss = run.loop_state.get("smooth_loss", 0.0)
        self.total_train_time = run.loop_state.get("total_train_time", 0.0)
        self.val_bpb, self.core, self.samples = None, None, []
        self.bar, self.log = None, print0
        if sys.stdout.isatty() and run.master:
            from tqdm import tqdm
            self.bar = tqdm(total=run.num_iterations, initial=run.start_step, dynamic_ncols=True, leave=False)
            self.log = self.bar.write

    def log_val(self, step, val_bpb):
        self.val_bpb = val_bpb
        self.history["val_step"].append(step)
        self.history["val_bpb"].append(val_bpb)
        self.log(f"step {step:05d} | val bpb {val_bpb:.4f}")
        if self.wandb_run:
            self.wandb_run.log({"step": step, "val/bpb": val_bpb})

    def log_core(self, step, core):
        self.core = core
        self.history["core_step"].append(step)
        self.history["core_metric"].append(core["core_metric"])
        self.log(f"step {step:05d} | CORE {core['core_metric']:.4f} ({core['seconds']:.1f}s)")
        if self.wandb_run:
            self.wandb_run.log({"step": step, "core_metric": core["core_metric"],
                                **{f"core/{k}": r["centered"] for k, r in core["tasks"].items()}})

    def log_samples(self, samples):
        self.samples = samples
        for s in samples:
            self.log(f"sample: {s!r}")

    def log_step(self, step, train_loss, lrm, dt):
        """The step line (benchmarks/bench_train.py parses it) after optimizer step `step` (1-based) took dt seconds.
        Returns the smoothed loss."""
        run = self.run
        ema = 0.9
        self.smooth_loss = ema * self.smooth_loss + (1 - ema) * train_loss
        debiased = self.smooth_loss / (1 - ema ** step)
        tok_per_sec = run.total_batch_size / dt
        mfu = 100 * run.flops_per_token * tok_per_sec / (self.peak_flops * run.world_size) if self.peak_flops else None
        if step > run.start_step + 10:
            self.total_train_time += dt  # the first steps include compilation
        eta = (run.num_iterations - step) * dt
        mfu_str = f"{mfu:.1f}%" if mfu is not None else "-"
        self.log(f"step {step:05d}/{run.num_iterations:05d} | loss {train_loss:.4f} (smooth {debiased:.4f}) | "
                 f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {mfu_str} | "
                 f"mem {peak_memory_gib(run.device):.2f}GiB | eta {duration(eta)}")
        self.history["step"].append(step)
        self.history["loss"].append(train_loss)
        self.history["tok_per_sec"].append(tok_per_sec)
        self.history["mfu"].append(mfu)
        if self.bar:
            self.bar.update(1)
        if self.wandb_run:
            self.wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm,
                                "train/tok_per_sec": tok_per_sec, "train/mfu": mfu})
        return debiased

    def loop_state(self):
        """Saved with each checkpoint, for a resumed run's smoothed loss and train time."""
        return dict(smooth_loss=self.smooth_loss, total_train_time=self.total_train_time, val_bpb=self.val_bpb)

    def summary(self):
        """The run's final numbers; throughput and MFU average the steps after the first 10 (compilation)."""
        run, history, core = self.run, self.history, self.core
        steady = history["tok_per_sec"][10:] or history["tok_per_sec"]
        steady_mfu = history["mfu"][10:]
        return dict(
            val_bpb=self.val_bpb, core_metric=core["core_metric"] if core else None, core=core,
            core_step=history["core_step"][-1] if core else None,
            final_loss=history["loss"][-1] if history["loss"] else None,
            tok_per_sec=sum(steady) / len(steady) if steady else None,
            mfu=(sum(m for m in steady_mfu if m) / max(1, len(steady_mfu))) if self.peak_flops else None,
            peak_memory_gib=peak_memory_gib(run.device), num_iterations=run.num_iterations, num_params=run.num_params,
            flops_per_token=run.flops_per_token, num_sparse_layers=run.converters.meta().get("sparse_layers", 0),
            world_size=run.world_size,
            device=torch.cuda.get_device_name(run.device) if run.device_type == "cuda" else run.device_type,
            torch_version=torch.__version__, checkpoint_dir=run.checkpointer.dir, samples=self.samples,
            total_train_time=self.total_train_time,
        )


def duration(seconds):
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.2f}m"


def finish(run, metrics):
    """The done line and the report; closes the progress bar, wandb and the process group.
    Returns train()'s dict."""
    if metrics.bar:
        metrics.bar.close()
    summary = metrics.summary()
    val_str = f"{metrics.val_bpb:.4f}" if metrics.val_bpb is not None else "-"
    print0(f"done: val bpb {val_str} | peak memory {summary['peak_memory_gib']:.2f}GiB | "
           f"train time {duration(metrics.total_train_time)} (after the first 10 steps)")
    if run.master:
        from nanochat.report import write_train_report
        path = write_train_report(os.path.join(get_base_dir(), "report"), run.model_tag, vars(run.args),
                                  metrics.history, summary)
        print0(f"report: {path}")
    if metrics.wandb_run:
        metrics.wandb_run.finish()
    compute_cleanup()
    return dict(history=metrics.history, summary=summary)


# -----------------------------------------------------------------------------
# The loop

def train(args):
    """Train per `args` (from build_arg_parser). Returns a dict with the history and final numbers."""
    run = setup(args)
    try:
        return loop(run)
    finally:
        run.checkpointer.close()  # the tag's lock, also when the run stops with an error


def loop(run):
    args = run.args
    metrics = Metrics(run)
    guard = CollapseGuard(args, run.model.config.vocab_size)
    batches = TrainBatches(run.loader)
    step = run.start_step
    while True:
        last_step = step >= run.num_iterations  # resume is checked to start before it; >= so no bug can run past it
        # the starting step is only evaluated: it is step 0 or a step already saved
        past_start = step > run.start_step
        val_bpb = None
        if due(args.eval_every, step, last_step):
            val_bpb = validate(run, metrics.log)
            metrics.log_val(step, val_bpb)
        if due(args.core_metric_every, step, last_step) and past_start:
            metrics.log_core(step, core_metric(run))
        if due(args.sample_every, step, last_step) and past_start and run.master:
            metrics.log_samples(sample(run))
        if due(args.save_every, step, last_step) and past_start:
            run.checkpointer.save(step, run.model, run.optimizers, batches.state, metrics.loop_state(), metrics.log,
                                  val_bpb=val_bpb, collapse_began=guard.began)
        if last_step:
            break

        run.sync()
        t0 = time.time()
        train_loss, lrm = train_step(run, batches, step)
        if not math.isfinite(train_loss):  # every rank holds the all-reduced loss, so all stop here
            raise diverged(f"the loss is {train_loss}", step + 1, run.checkpointer.last_saved)
        run.sync()
        dt = time.time() - t0
        step += 1
        why = guard.update(step, metrics.log_step(step, train_loss, lrm, dt))
        if why:  # before this step's save; every rank holds the same loss, so all stop here
            raise collapsed(why, step, run.checkpointer.good_step(guard.began))
    return finish(run, metrics)
