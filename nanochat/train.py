"""
The pretraining loop. `scripts/base_train.py` parses the flags (nanochat/flags.py) and calls train(). Top to
bottom: set-up (model, the --sparse/--fp8 converter (nanochat/accel/converters.py), optimizers, the
Checkpointer (nanochat/checkpoint.py), resume, DDP, compile); train_step(), one optimizer step over the
micro-batches; the actions between steps (val bpb, CORE, samples); and train() with loop(), the loop, which
reports through Metrics (nanochat/metrics.py) and stops bad runs through the guards (nanochat/guards.py).
"""

import argparse
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import checkpoint, storage
from nanochat.accel.converters import LinearConverter
from nanochat.accel.kernel_choice import default_timing_cache
from nanochat.checkpoint import Checkpointer
from nanochat.common import UserError, autodetect_device_type, compute_cleanup, compute_init, get_base_dir, print0
from nanochat.evaluation import evaluate_bpb, sample_text
from nanochat.flags import (CPU_EVAL_TOKENS, CPU_MAX_DEFAULT_PARAMS, DEFAULT_DEPTH, GPU_EVAL_TOKENS, MAKE_TRAIN_FLAGS,
                            resume_command, validate_args)
from nanochat.gpt import GPT, config_from_depth
from nanochat.guards import CollapseGuard, StopSignals, Stopped, collapsed, diverged
from nanochat.metrics import EVENTS_FILE, EventLog, Metrics, SetupLog, finish, write_start
from nanochat.optim import lr_multiplier, muon_momentum, setup_optimizers


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


def resolve_num_iterations(args, flops_per_token, num_params, total_batch_size):
    if args.num_iterations > 0:
        return args.num_iterations
    if args.target_flops > 0:
        return max(1, round(args.target_flops / (flops_per_token * total_batch_size)))
    if args.target_param_data_ratio > 0:
        return max(1, round(args.target_param_data_ratio * num_params / total_batch_size))
    raise UserError("no training horizon: set --num-iterations, --target-flops or --target-param-data-ratio")


# -----------------------------------------------------------------------------
# Set-up: the model, its converter (sparse, fp8), optimizers, resume, DDP and compile

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


def build_converter(args, device, grad_accum_steps, log=print0):
    """The run's fast linears from --sparse and --fp8 (nanochat/accel/converters.py). Kernels and fp8 layers are
    chosen for this micro-batch's token count; the 2:4 ones weigh their saving over the step's micro-batches
    against one re-pack per step. Both read and extend one timing cache in the base dir
    (nanochat/accel/kernel_choice.py)."""
    return LinearConverter(device, sparse=args.sparse, fp8=args.fp8, backend=args.sparse_backend,
                           tokens=args.device_batch_size * args.max_seq_len, micro_batches=grad_accum_steps,
                           fp8_layers=args.fp8_layers,
                           timing_cache=default_timing_cache(log=log) if (args.sparse or args.fp8) else None, log=log)


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


def wrap_model(model, is_ddp, local_rank, device_type, converter, use_compile, recompute=False):
    """DDP, then compile last. Returns (the model the training forward passes call, the DDP wrapper or None).
    converter.sync re-packs what DDP's broadcast or a resumed checkpoint's load wrote."""
    train_model, ddp_model = model, None
    if is_ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ddp_model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
        train_model = ddp_model
    converter.sync(model)
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
    converter: LinearConverter  # --sparse, --fp8
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
    events: EventLog  # --events (rank 0)

    @property
    def master(self):
        return self.rank == 0


def latest_step(checkpoint_dir):
    """--resume-from-step latest: the newest saved step whose files match their sha256, naming newer ones skipped."""
    step, skipped = checkpoint.newest_verified_step(checkpoint_dir)
    if step is None:
        why = f"; damaged: {', '.join(f'step {s} ({p}: {w})' for s, p, w in skipped)}" if skipped else ""
        raise UserError(f"--resume-from-step latest: no checkpoint with complete files in {checkpoint_dir} "
                        f"({checkpoint.existing_tags(checkpoint_dir)}{why}): check --model-tag, or start a fresh run")
    notes = "; ".join(f"skipped step {s}: {p} is damaged ({w})" for s, p, w in skipped)
    print0(f"--resume-from-step latest: step {step}" + (f" ({notes})" if notes else ""))
    return step


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
    if args.eval_tokens is None:
        args.eval_tokens = CPU_EVAL_TOKENS if device_type == "cpu" else GPU_EVAL_TOKENS
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
    setup_log = SetupLog()  # the kernel choices, for the start event
    converter = build_converter(args, device, grad_accum_steps, log=setup_log)
    converter.convert(model)
    optimizers = setup_optimizers(model, args.embedding_lr, args.unembedding_lr, args.matrix_lr,
                                  args.weight_decay, device_type)
    for opt in optimizers:  # the 2:4 re-pack, once per optimizer step
        opt.register_step_post_hook(lambda *_: converter.post_optimizer_hook(model))

    run_meta = dict(model_config=model.config.to_dict(), args=vars(args), world_size=world_size,
                    tokenizer=tokenizer.identity(), total_batch_size=total_batch_size, **converter.meta())
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
        train_model, ddp_model = wrap_model(model, is_ddp, local_rank, device_type, converter, use_compile, recompute)

        loader = DistributedDataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device,
                                       rank=rank, world_size=world_size, state=loader_state)
        core_eval = None
        if core_tasks is not None:
            from nanochat.core_eval import CoreEval
            core_eval = CoreEval(core_tasks, tokenizer, model.rotary_seq_len, args.device_batch_size * args.max_seq_len)
        events = EventLog((args.events or os.path.join(checkpoint_dir, EVENTS_FILE)) if rank == 0 else None,
                          append=start_step > 0)
    except BaseException:
        checkpointer.close()
        raise

    run = Run(args=args, device=device, device_type=device_type, rank=rank, world_size=world_size,
              autocast_ctx=autocast_ctx, sync=torch.cuda.synchronize if device_type == "cuda" else (lambda: None),
              tokenizer=tokenizer, token_bytes=token_bytes, model=model, train_model=train_model, ddp_model=ddp_model,
              optimizers=optimizers, num_params=num_params, flops_per_token=flops_per_token, converter=converter,
              total_batch_size=total_batch_size, grad_accum_steps=grad_accum_steps, num_iterations=num_iterations,
              eval_steps=max(1, args.eval_tokens // tokens_per_micro_batch), model_tag=model_tag,
              checkpointer=checkpointer, start_step=start_step, loop_state=loop_state, loader=loader, core_eval=core_eval,
              events=events)
    write_start(run, setup_log)
    return run


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
    agree (the converter's check: with sparse layers, every rank pruned the same masks)."""
    from nanochat.dataloader import DistributedDataLoader
    args = run.args
    run.model.eval()
    val_loader = DistributedDataLoader(run.tokenizer, args.device_batch_size, args.max_seq_len, "val", run.device,
                                       rank=run.rank, world_size=run.world_size)
    progress = log if run.device_type == "cpu" else None  # minutes on CPU: say how far it got
    val_bpb = evaluate_bpb(run.train_model, val_loader, run.eval_steps, run.token_bytes, run.autocast_ctx, progress)
    run.model.train()
    run.converter.check_replicas(run.model, log)
    return val_bpb


def core_metric(run):
    """CORE on the bundle's tasks: every rank scores its share, with the eager model (the example shapes vary)."""
    run.model.eval()
    with run.autocast_ctx, run.converter.eager(run.model):
        core = run.core_eval.evaluate(run.model, run.device)
    run.model.train()
    return core


def sample(run):
    """Greedy continuations of SAMPLE_PROMPTS."""
    run.model.eval()
    with run.autocast_ctx, run.converter.eager(run.model):  # fp8 layers sample in bf16 (one token at a time)
        samples = sample_text(run.model, run.tokenizer)
    run.model.train()
    return samples


# -----------------------------------------------------------------------------
# The loop

def train(args):
    """Train per `args` (from build_arg_parser). Returns a dict with the history and final numbers; raises
    Stopped when SIGINT/SIGTERM ended the run after a step."""
    run = setup(args)
    try:
        with StopSignals() as signals:
            return loop(run, signals)
    finally:
        run.checkpointer.close()  # the tag's lock, also when the run stops with an error


@torch.no_grad()
def loss_of_weights(run, batches):
    """The loss of the current weights on the next step's first micro-batch, averaged over ranks: evaluated as
    validate() does (eval mode, no grad: the same compiled graph), before any step has seen it."""
    run.model.eval()
    with run.autocast_ctx:
        losses = run.train_model(batches.x, batches.y, loss_reduction="none").float().view(-1)
    counted = batches.y.view(-1) != -1  # ignore_index targets count 0 in the losses
    loss = (losses * counted).sum() / counted.sum().clamp(min=1)
    run.model.train()
    if dist.is_initialized():
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    return loss.item()


def save(run, step, batches, metrics, guard, val_bpb=None):
    """Saves step `step` once its weights passed the checks: finite, and their own loss (the step's logged
    loss is that of the weights before it) finite and within --collapse-rise of the best smoothed loss. So no
    checkpoint, the last good one that pruning keeps through a collapse included, holds weights that already
    went bad. Returns None once saved, else why it was not (the run goes on; the guard stops it if it stays bad)."""
    run.checkpointer.check_weights(run.model, step)
    loss = loss_of_weights(run, batches)
    if not math.isfinite(loss):  # averaged over ranks: all stop here
        raise diverged(f"the loss of its weights is {loss}", step, run.checkpointer.last_saved)
    why = guard.too_high(loss)
    if why:
        metrics.log(f"step {step} not saved: the loss of its weights, {loss:.4f} on the next batch, is {why}")
        return why
    run.checkpointer.save(step, run.model, run.optimizers, batches.state, metrics.loop_state(), metrics.log,
                          val_bpb=val_bpb, collapse_began=guard.began)
    return None


def stop(run, signum, step, batches, metrics, guard):
    """The end of a run a signal stopped after `step`: a checkpoint of it (unless --save-every 0) and Stopped."""
    name = signal.Signals(signum).name
    why = "--save-every 0"
    if run.args.save_every != 0:
        why = save(run, step, batches, metrics, guard) if run.checkpointer.last_saved != step else None
    compute_cleanup()
    if why is None:
        raise Stopped(f"stopped by {name} after step {step}, saved in {run.checkpointer.dir}; resume with: "
                      f"{resume_command(run.args, step, run.world_size)}", signum)
    last = run.checkpointer.last_saved
    kept = f"resume from step {last} with: {resume_command(run.args, last, run.world_size)}" if last is not None \
        else "no checkpoint of this run was saved"
    raise Stopped(f"stopped by {name} after step {step}, not saved ({why}); {kept}", signum)


def loop(run, signals):
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
            save(run, step, batches, metrics, guard, val_bpb)
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
        signum = signals.agreed(run.device)
        if signum:
            stop(run, signum, step, batches, metrics, guard)
    return finish(run, metrics)
