"""
Checkpoints, one directory per model tag:
  model_{step:06d}.pt              model state_dict (dense weights; sparse masks are recomputed from them)
  optim_{step:06d}_rank{r}.pt      optimizer states, data loader position and RNG states of rank r
  meta_{step:06d}.json             model config, training args, step, loop state, val bpb (when measured at
                                   that step), the tokenizer's vocab size and sha256, and the size and sha256
                                   of every file above
  .lock                            while a run trains on the tag (nanochat/storage.py)
Every file is written to a temporary name, flushed to disk and renamed, so a crash never leaves a
half-written checkpoint and never touches an earlier one. The meta file goes last: a step counts as
saved only once its meta exists. Loading checks each file against the sizes and checksums in the meta
and reads .pt files with weights_only=True (tensors and plain containers only: a checkpoint from
someone else cannot run code). Every problem is a UserError naming the file and the steps still intact.
The Checkpointer at the end is a training run's view of its tag: lock, storage checks, resume, save, pruning.
"""

import glob
import hashlib
import json
import os
import pickle
import re

import torch
import torch.distributed as dist

from nanochat import storage
from nanochat.common import UserError, print0
from nanochat.flags import RESUME_HYPERPARAMETERS
from nanochat.guards import diverged

# meta["format"]: 2 = meta records each file's size and sha256. Format 1 (no "files" key) loads unchecked.
FORMAT = 2


class _HashingWriter:
    """Write-through file wrapper: the checksum costs no second read of a multi-GB file."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, data):
        self.sha.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def _fsync_dir(path):
    # the renames themselves must reach the disk before an older checkpoint may be deleted
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, write):
    """write(file) into a temp file, fsync, rename to path. Returns {"bytes": size, "sha256": hex}."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        write(w)
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return {"bytes": size, "sha256": w.sha.hexdigest()}


def _save_torch(obj, path):
    return _atomic_write(path, lambda f: torch.save(obj, f))


def _save_json(obj, path):
    return _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def sha256_file(path, chunk=1 << 24):
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            sha.update(data)
    return sha.hexdigest()


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    # map_location moved every tensor of the rank file to the device; RNG states must be CPU byte tensors
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def model_name(step):
    return f"model_{step:06d}.pt"


def optim_name(step, rank):
    return f"optim_{step:06d}_rank{rank}.pt"


def meta_name(step):
    return f"meta_{step:06d}.json"


def _gather_records(step, record):
    """Every rank's optimizer-file record, gathered as fixed-size byte tensors (8 bytes of size, 32 of sha256)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(list(record["bytes"].to_bytes(8, "little") + bytes.fromhex(record["sha256"])),
                        dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    # gloo frees a finished all_gather on its worker thread, which takes the GIL to drop these tensors; if a
    # rank exits right after the last checkpoint, DDP's teardown (joining that thread while holding the GIL)
    # would deadlock. A barrier waits with the GIL released, so the worker finishes first.
    dist.barrier()
    records = {}
    for r, t in enumerate(gathered):
        raw = bytes(t.cpu().tolist())
        records[optim_name(step, r)] = {"bytes": int.from_bytes(raw[:8], "little"), "sha256": raw[8:].hex()}
    return records


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states, loader_state, meta, rank=0):
    """Rank 0 writes model and meta; every rank writes its own optimizer/loader/RNG file.
    Everything in these files is a tensor or a plain container (weights_only-loadable)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    if rank == 0 and os.path.exists(os.path.join(checkpoint_dir, meta_name(step))):
        os.remove(os.path.join(checkpoint_dir, meta_name(step)))  # replacing a step: it is unsaved until the new meta
    rank_state = {"optimizers": optimizer_states, "loader": loader_state, "rng": rng_state()}
    files = {optim_name(step, rank): _save_torch(rank_state, os.path.join(checkpoint_dir, optim_name(step, rank)))}
    if dist.is_initialized():
        # rank 0 records every rank's file; the gather also waits until all of them exist
        files = _gather_records(step, files[optim_name(step, rank)])
    if rank == 0:
        files[model_name(step)] = _save_torch(model_state, os.path.join(checkpoint_dir, model_name(step)))
        _fsync_dir(checkpoint_dir)
        _save_json({**meta, "step": step, "format": FORMAT, "files": files},
                   os.path.join(checkpoint_dir, meta_name(step)))
        _fsync_dir(checkpoint_dir)


def saved_steps(checkpoint_dir):
    """Steps with a meta file, ascending (whether their files are intact is checked on load)."""
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        m = re.match(r"meta_(\d+)\.json$", os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def step_files(checkpoint_dir, step):
    """Every file of one saved step: model, meta and all ranks' optimizer files."""
    return [os.path.join(checkpoint_dir, n) for n in (model_name(step), meta_name(step))
            if os.path.exists(os.path.join(checkpoint_dir, n))] + \
        sorted(glob.glob(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank*.pt")))


def prune_checkpoints(checkpoint_dir, current_step, keep, replaced=(), protect=()):
    """After step current_step is saved: delete the steps before it beyond the newest `keep` (0 = keep all),
    and the `replaced` steps of an earlier run that this one overwrites. Steps after current_step stay:
    they belong to the run this one resumed from; `protect` steps (the last good one, the best val bpb) stay
    beyond the `keep`. Returns the deleted steps."""
    steps = saved_steps(checkpoint_dir)
    older = [s for s in steps if s < current_step]
    doomed = set(older[:max(0, len(older) - (keep - 1))]) if keep > 0 else set()  # current_step is one of `keep`
    doomed -= set(protect)
    doomed |= {s for s in replaced if s != current_step and s in steps}
    for s in sorted(doomed):
        os.remove(os.path.join(checkpoint_dir, meta_name(s)))  # first: a step without meta is not a saved step
        for path in step_files(checkpoint_dir, s):
            os.remove(path)
    return sorted(doomed)


# ---------------------------------------------------------------------------
# Loading

def best_val_step(checkpoint_dir, steps):
    """The step among `steps` whose meta records the lowest val bpb, or None."""
    scored = []
    for step in steps:
        meta = _read_meta(checkpoint_dir, step)
        if isinstance(meta, dict) and isinstance(meta.get("val_bpb"), (int, float)):
            scored.append((meta["val_bpb"], step))
    return min(scored)[1] if scored else None


def remove_unsaved(checkpoint_dir, step):
    """Deletes the files of a step whose save did not finish (no meta): they belong to no saved step."""
    if os.path.exists(os.path.join(checkpoint_dir, meta_name(step))):
        return
    for path in step_files(checkpoint_dir, step):
        try:
            os.remove(path)
        except OSError:
            pass


def existing_tags(checkpoint_dir):
    """'tags with checkpoints: a, b' for the base_checkpoints directory above checkpoint_dir, for errors
    about a tag that has none."""
    root = os.path.dirname(checkpoint_dir)
    tags = sorted(t for t in (os.listdir(root) if os.path.isdir(root) else [])
                  if saved_steps(os.path.join(root, t)))
    return f"tags with checkpoints: {', '.join(tags)}" if tags else f"no tag under {root} has checkpoints yet"


def _read_meta(checkpoint_dir, step):
    """The meta dict, or a string saying what is wrong with the file."""
    path = os.path.join(checkpoint_dir, meta_name(step))
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"not valid JSON: {e}" if not isinstance(e, OSError) else str(e)
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict) or meta.get("step") != step:
        return "not a checkpoint meta file of this step"
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("bytes"), int)
                                              and isinstance(r.get("sha256"), str) for r in files.values()):
        return "its file records are malformed"
    return meta


def _file_problem(checkpoint_dir, name, record, check_hash):
    """None, or what is wrong with one checkpoint file against its meta record (None: no record)."""
    path = os.path.join(checkpoint_dir, name)
    if not os.path.exists(path):
        return "missing"
    size = os.path.getsize(path)
    if record is None:
        return "empty" if size == 0 else None
    if size != record["bytes"]:
        return f"{size:,} bytes, the meta file recorded {record['bytes']:,}"
    if check_hash and sha256_file(path) != record["sha256"]:
        return "its sha256 differs from the one the meta file recorded"
    return None


def _expected_files(meta, step):
    """{name: record or None} of the files the step's meta says it has."""
    if "files" in meta:
        return meta["files"]
    # format 1: no records; the model file and one optimizer file per process
    return {model_name(step): None, **{optim_name(step, r): None for r in range(meta.get("world_size", 1))}}


def step_problem(checkpoint_dir, step, check_hash):
    """None, or (path, what is wrong) for the first damaged file of a saved step: its meta, then each file the
    meta records (sizes; with check_hash also the sha256 of every file, all ranks' included)."""
    meta = _read_meta(checkpoint_dir, step)
    if isinstance(meta, str):
        return os.path.join(checkpoint_dir, meta_name(step)), meta
    for name, record in _expected_files(meta, step).items():
        why = _file_problem(checkpoint_dir, name, record, check_hash)
        if why:
            return os.path.join(checkpoint_dir, name), why
    return None


def intact_steps(checkpoint_dir):
    """Saved steps whose meta parses and whose files all have the recorded sizes (checksums are checked on load)."""
    return [step for step in saved_steps(checkpoint_dir) if step_problem(checkpoint_dir, step, False) is None]


def newest_verified_step(checkpoint_dir):
    """--resume-from-step latest: the newest saved step whose files all match their recorded sizes and sha256,
    checked newest first. Returns (that step or None, [(step, path, why) of each newer step skipped])."""
    skipped = []
    for step in reversed(saved_steps(checkpoint_dir)):
        problem = step_problem(checkpoint_dir, step, True)
        if problem is None:
            return step, skipped
        skipped.append((step, *problem))
    return None, skipped


def _damaged(checkpoint_dir, step, path, why, step_flag):
    others = [s for s in intact_steps(checkpoint_dir) if s != step]
    if others:
        hint = f"saved steps with complete files: {', '.join(map(str, others))}; use {step_flag} {others[-1]}"
    elif step_flag == "--resume-from-step":
        hint = "no other saved step has complete files: start over with --overwrite or a new --model-tag"
    else:
        hint = "no other saved step has complete files: train again"
    return UserError(f"checkpoint file {path} is damaged ({why}): {hint}")


def load_meta(checkpoint_dir, step, step_flag="--resume-from-step"):
    path = os.path.join(checkpoint_dir, meta_name(step))
    if not os.path.exists(path):
        have = saved_steps(checkpoint_dir)
        hint = f"saved steps: {', '.join(map(str, have))}" if have else f"no checkpoints there; {existing_tags(checkpoint_dir)}"
        raise UserError(f"no checkpoint at step {step} in {checkpoint_dir} ({hint}): pick one of the saved steps "
                        f"or check --model-tag")
    meta = _read_meta(checkpoint_dir, step)
    if isinstance(meta, str):
        raise _damaged(checkpoint_dir, step, path, meta, step_flag)
    return meta


def _first_sentence(e):
    """Type and first sentence of an exception: torch.load's messages run to several lines of advice."""
    text = str(e).strip()
    text = re.split(r"(?<=\.)\s", text.splitlines()[0])[0][:160].rstrip(".") if text else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _torch_load(checkpoint_dir, step, name, device, step_flag):
    path = os.path.join(checkpoint_dir, name)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any pickled object other than tensors and plain containers
        raise UserError(f"checkpoint file {path} holds pickled Python objects other than tensors and plain "
                        f"containers, which could run code on load ({_first_sentence(e)}): it was not written by "
                        f"this trainer; use a checkpoint saved by it")
    except Exception as e:  # truncated zip, bad header, I/O error: all mean the file is unusable
        raise _damaged(checkpoint_dir, step, path, f"torch.load: {_first_sentence(e)}", step_flag)


def load_checkpoint(checkpoint_dir, step, device, rank=0, load_optimizer=True, step_flag="--resume-from-step"):
    """Returns (model_state, rank_state or None, meta), after checking the files against the meta.
    Every rank checks the sizes of all files (so all ranks fail alike) and the checksums of those it reads.
    step_flag is the caller's flag that picks a step, for the hint in error messages."""
    meta = load_meta(checkpoint_dir, step, step_flag)
    expected = _expected_files(meta, step)
    if load_optimizer and optim_name(step, rank) not in expected:
        raise UserError(f"checkpoint step {step} in {checkpoint_dir} was saved by {meta.get('world_size', 1)} "
                        f"processes and has no state for rank {rank}: resume with "
                        f"--nproc_per_node={meta.get('world_size', 1)}")
    mine = {model_name(step)} | ({optim_name(step, rank)} if load_optimizer else set())
    for name, record in expected.items():
        if name.startswith("optim_") and not load_optimizer:
            continue
        why = _file_problem(checkpoint_dir, name, record, check_hash=name in mine)
        if why:
            raise _damaged(checkpoint_dir, step, os.path.join(checkpoint_dir, name), why, step_flag)
    model_state = _torch_load(checkpoint_dir, step, model_name(step), device, step_flag)
    rank_state = _torch_load(checkpoint_dir, step, optim_name(step, rank), device, step_flag) if load_optimizer else None
    return model_state, rank_state, meta


def tokenizer_need(meta, checkpoint_dir):
    """What a checkpoint needs of the tokenizer, for nanochat.tokenizer.get_tokenizer(need=...): its vocab size
    and sha256 (checkpoints from before the meta recorded the tokenizer: the model's vocab size only)."""
    recorded = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    return dict(vocab_size=recorded.get("vocab_size", meta["model_config"].get("vocab_size")),
                sha256=recorded.get("sha256"), what=f"checkpoint {checkpoint_dir} step {meta['step']}")


def check_batch(meta, device_batch_size, total_batch_size, world_size, allowed):
    """A resumed run takes the batches the saved one would have taken, unless --allow-batch-change."""
    saved_args = meta.get("args", {})
    saved_dbs = saved_args.get("device_batch_size", device_batch_size)
    saved_total = meta.get("total_batch_size")
    if saved_total is None:  # older metas record the flag only; -1 = one micro-batch per process
        flag = saved_args.get("total_batch_size", total_batch_size)
        saved_total = flag if flag != -1 else saved_dbs * saved_args.get("max_seq_len", 0) * meta.get("world_size", world_size)
    if allowed or (saved_dbs, saved_total) == (device_batch_size, total_batch_size):
        return
    raise UserError(f"checkpoint step {meta['step']} was trained with --device-batch-size {saved_dbs} and "
                    f"{saved_total:,} tokens per step, this run has {device_batch_size} and {total_batch_size:,}: "
                    f"pass the same --device-batch-size/--total-batch-size, or --allow-batch-change to continue with "
                    f"these (the data continues from the saved position, but each step averages another number of "
                    f"tokens, so the run no longer matches an uninterrupted one)")


def check_compatible(meta, model_config, world_size):
    """A checkpoint must come from the same model shape and process count as the run resuming it."""
    saved = meta["model_config"]
    diffs = [f"{k}={saved.get(k)} (now {v})" for k, v in model_config.items() if saved.get(k) != v]
    if diffs:
        raise UserError("checkpoint was trained with another model config: " + ", ".join(diffs) +
                        "; pass the same --depth/--max-seq-len/--aspect-ratio/--head-dim or a different --model-tag")
    if meta.get("world_size", world_size) != world_size:
        raise UserError(f"checkpoint was saved by {meta['world_size']} processes, this run has {world_size}: "
                        f"resume with --nproc_per_node={meta['world_size']}")


def load_moments(optimizer, state):
    """The saved optimizer's per-parameter state (its moments) into `optimizer`; the param groups keep the
    hyperparameters this run's flags gave them (lr, initial_lr, weight decay), which load_state_dict would
    replace with the saved run's."""
    flags = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)


def changed_hyperparameters(saved_args, args):
    """'--matrix-lr 0.01 (checkpoint: 0.02), ...' for each of RESUME_HYPERPARAMETERS that differs, or ''."""
    return ", ".join(f"--{k.replace('_', '-')} {args[k]} (checkpoint: {saved_args[k]})" for k in RESUME_HYPERPARAMETERS
                     if k in saved_args and saved_args[k] != args.get(k))


def load_model_for_inference(checkpoint_dir, step=None, device="cpu"):
    """Build a GPT from a checkpoint (latest step when step is None) for evaluation or sampling, with the
    converter its meta asks for (a sparse checkpoint: its MLP layers 2:4 again, the same masks)."""
    from nanochat.accel.converters import LinearConverter
    from nanochat.gpt import GPT, GPTConfig
    if step is None:
        steps = saved_steps(checkpoint_dir)
        if not steps:
            raise UserError(f"no checkpoints in {checkpoint_dir}: train first (python -m scripts.base_train) or check "
                            f"--model-tag ({existing_tags(checkpoint_dir)})")
        step = steps[-1]
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, step_flag="--step")
    model = GPT(GPTConfig(**meta["model_config"]))
    model.to(device)
    model.init_weights()  # buffers (rotary tables); weights are overwritten below
    converter = LinearConverter.from_meta(meta, device)
    converter.convert(model)
    model.load_state_dict(model_state, strict=True)
    converter.sync(model)  # the 2:4 layers re-packed from the loaded weights
    model.eval()
    return model, meta


def check_fresh_run(args, checkpoint_dir):
    """A fresh run that saves checkpoints must not silently replace another run's. Returns the steps that
    --overwrite replaces (deleted once this run's first checkpoint is complete)."""
    if args.resume_from_step >= 0 or args.save_every == 0:
        return []
    steps = saved_steps(checkpoint_dir)
    if steps and not args.overwrite:
        raise UserError(f"{checkpoint_dir} already holds checkpoints of another run (steps {', '.join(map(str, steps))}): "
                        f"continue it with --resume-from-step {steps[-1]}, replace it with --overwrite, "
                        f"or pick a new --model-tag")
    return steps


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
        """Loads weights, optimizer moments and RNG states of --resume-from-step; learning rates and the other
        flags are this run's. Returns (step, loop state, this rank's loader state)."""
        meta = load_meta(self.dir, args.resume_from_step)
        check_compatible(meta, model.config.to_dict(), world_size)
        check_batch(meta, args.device_batch_size, self.run_meta["total_batch_size"], world_size,
                               args.allow_batch_change)
        if meta["step"] >= num_iterations:
            horizon = f"--num-iterations {num_iterations}" if args.num_iterations > 0 else \
                "from --target-flops/--target-param-data-ratio"
            raise UserError(f"cannot resume from step {meta['step']}: the run ends at step {num_iterations} ({horizon}); "
                            f"pass --num-iterations greater than {meta['step']} to train further")
        model_state, rank_state, meta = load_checkpoint(self.dir, args.resume_from_step, device, self.rank)
        model.load_state_dict(model_state, strict=True)
        for opt, state in zip(optimizers, rank_state["optimizers"]):
            load_moments(opt, state)
        changed = changed_hyperparameters(meta.get("args", {}), vars(args))
        if changed:
            print0(f"resuming step {meta['step']} with flags that differ from its run's: {changed}")
        set_rng_state(rank_state["rng"])
        self.last_saved = meta["step"]
        print0(f"resumed from {self.dir} at step {meta['step']}")
        return meta["step"], meta.get("loop_state", {}), rank_state["loader"]

    def good_step(self, collapse_began):
        """The newest saved step from before a collapse that began at step collapse_began (None: no collapse)."""
        if collapse_began is None:
            return None
        before = [s for s in saved_steps(self.dir) if s < collapse_began and s not in self.replaced_steps]
        return before[-1] if before else None

    def check_weights(self, model, step):
        # a finite loss can still come with a non-finite update: never save (and keep-last-k never
        # prunes good checkpoints for) weights that are not finite; DDP replicas agree, so all ranks stop
        if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
            raise diverged("the weights are not finite", step, self.last_saved)

    def save(self, step, model, optimizers, loader_state, loop_state, log, val_bpb=None, collapse_began=None):
        """val_bpb: measured at this step (recorded in the meta, for the best-val-bpb checkpoint that pruning keeps).
        collapse_began: the first step of a streak of collapsed losses, whose last good checkpoint pruning keeps."""
        self.check_weights(model, step)
        try:
            save_checkpoint(self.dir, step, model.state_dict(), [o.state_dict() for o in optimizers],
                            loader_state, dict(self.run_meta, loop_state=loop_state, val_bpb=val_bpb), self.rank)
        except Exception as e:
            err = storage.disk_error(e)
            if err is None:
                raise
            storage.remove_own_temps(self.dir)
            if self.rank == 0:
                remove_unsaved(self.dir, step)
            kept = f"the earlier checkpoints are intact (newest: step {self.last_saved}, --resume-from-step " \
                   f"{self.last_saved})" if self.last_saved is not None else "no checkpoint of this run was saved"
            raise UserError(f"saving checkpoint step {step} to {self.dir} failed ({err.strerror}; "
                            f"{storage.free_bytes(self.dir):,} bytes free there): {kept}; free space or fix the disk")
        log(f"saved checkpoint step {step} to {self.dir}")
        self.last_saved = step
        if self.rank == 0:
            mine = [s for s in saved_steps(self.dir) if s not in self.replaced_steps]
            protect = {s for s in (self.good_step(collapse_began), best_val_step(self.dir, mine))
                       if s is not None}
            deleted = prune_checkpoints(self.dir, step, self.keep_last_k, self.replaced_steps, protect)
            self.replaced_steps = []
            if deleted:
                log(f"deleted checkpoint steps {', '.join(map(str, deleted))} (--keep-last-k {self.keep_last_k}"
                    f"{', --overwrite' if self.overwrite else ''})")
