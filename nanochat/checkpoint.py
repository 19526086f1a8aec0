"""
Checkpoints, one directory per model tag:
  model_{step:06d}.pt              model state_dict (dense weights; sparse masks are recomputed from them)
  meta_{step:06d}.json             model config, training args, step, loop state
  optim_{step:06d}_rank{r}.pt      optimizer states, data loader position and RNG states of rank r
Every file is written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint and never touches an earlier one.
"""

import glob
import json
import os
import re

import torch

from nanochat.common import UserError


def _atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    if path.endswith(".json"):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


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


def save_checkpoint(checkpoint_dir, step, model_state, optimizer_states, loader_state, meta, rank=0):
    """Rank 0 writes model and meta; every rank writes its own optimizer/loader/RNG file.
    The meta file goes last: a step counts as saved only once its meta exists."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    rank_state = {"optimizers": optimizer_states, "loader": loader_state, "rng": rng_state()}
    _atomic_save(rank_state, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"))
    if rank == 0:
        _atomic_save(model_state, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # all rank files exist before the step is marked complete
    if rank == 0:
        _atomic_save({**meta, "step": step}, os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))


def saved_steps(checkpoint_dir):
    steps = []
    for path in glob.glob(os.path.join(checkpoint_dir, "meta_*.json")):
        m = re.match(r"meta_(\d+)\.json$", os.path.basename(path))
        if m:
            steps.append(int(m.group(1)))
    return sorted(steps)


def load_meta(checkpoint_dir, step):
    path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if not os.path.exists(path):
        have = saved_steps(checkpoint_dir)
        hint = f"saved steps: {have}" if have else "no checkpoints there"
        raise UserError(f"no checkpoint at step {step} in {checkpoint_dir} ({hint}): pick one of the saved steps or check --model-tag")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(checkpoint_dir, step, device, rank=0, load_optimizer=True):
    """Returns (model_state, rank_state or None, meta)."""
    meta = load_meta(checkpoint_dir, step)
    model_state = torch.load(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), map_location=device)
    rank_state = None
    if load_optimizer:
        path = os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")
        if not os.path.exists(path):
            raise UserError(f"checkpoint step {step} in {checkpoint_dir} has no state for rank {rank}: "
                            f"resume with the same number of processes it was saved with")
        rank_state = torch.load(path, map_location=device, weights_only=False)
    return model_state, rank_state, meta


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


def load_model_for_inference(checkpoint_dir, step=None, device="cpu"):
    """Build a GPT from a checkpoint (latest step when step is None) for evaluation or sampling.
    A sparse checkpoint gets its MLP layers converted back with the masked backend on CPU
    (or the configured backend on CUDA), so the same 2:4 masks apply."""
    from nanochat.gpt import GPT, GPTConfig
    if step is None:
        steps = saved_steps(checkpoint_dir)
        if not steps:
            raise UserError(f"no checkpoints in {checkpoint_dir}: train first (python -m scripts.base_train) or check --model-tag")
        step = steps[-1]
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    model = GPT(GPTConfig(**meta["model_config"]))
    model.to(device)
    model.init_weights()  # buffers (rotary tables); weights are overwritten below
    if meta.get("sparse"):
        from nanochat.sparse import SparseConfig, convert_mlp_to_sparse
        backend = meta.get("sparse_backend", "auto") if torch.device(device).type == "cuda" else "masked"
        convert_mlp_to_sparse(model, torch.device(device), SparseConfig(backend=backend, log=lambda *a, **k: None))
    model.load_state_dict(model_state, strict=True)
    model.eval()
    return model, meta
