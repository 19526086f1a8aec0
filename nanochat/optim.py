"""
Optimizers: Muon for the transformer's hidden 2-D matrices, AdamW for embeddings and lm_head,
and the learning-rate schedule (linear warmup, constant, linear warmdown).
"""

import torch
import torch.distributed as dist


def zeropower_via_newtonschulz5(G, steps=5):
    """Approximately orthogonalize G (the nearest semi-orthogonal matrix, up to singular-value noise)
    with a quintic Newton-Schulz iteration. bf16 on GPU is enough: the iteration is self-correcting."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if G.is_cuda else G.float()
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz: SGD-momentum (Nesterov), then each 2-D update is
    replaced by its orthogonalization, scaled so that tall and wide matrices move alike.
    The matrices of one shape are orthogonalized in one batched call.

    shard=True is for DDP, where every rank holds the same all-reduced gradients: of a shape's n
    matrices, rank r orthogonalizes only the r-th contiguous share of ceil(n / world) (zero-padded, so
    every rank runs the same batched call) and one all_gather hands every rank all n updates, in the
    dtype Newton-Schulz computes in (bf16 on GPU). Every rank still keeps the momentum buffer of every
    matrix (elementwise, cheap): the optimizer state, and so each rank's checkpoint of it, is the same
    as without sharding, whatever the world size."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 shard=False, process_group=None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
        self.process_group = process_group
        self.world = dist.get_world_size(process_group) if shard else 1
        self.rank = dist.get_rank(process_group) if shard else 0

    @torch.no_grad()
    def step(self):
        # Every shape's Newton-Schulz (and all_gather) is launched before any update is applied, so that
        # one shape's all_gather runs while the next shape is orthogonalized. Sharding needs every rank to
        # hold gradients for the same parameters (DDP gives all of them, all-reduced).
        pending = []
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for params in by_shape.values():
                grads = [p.grad for p in params]
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
                bufs = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                pending.append((group, params, *self._orthogonalize(grads, bufs, group)))
        for group, params, ortho, work in pending:
            if work is not None:
                work.wait()
            rows, cols = params[0].shape
            scale = max(1.0, rows / cols) ** 0.5
            if group["weight_decay"] > 0:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, list(ortho[:len(params)].to(params[0].dtype).unbind(0)),
                                alpha=-group["lr"] * scale)

    def _orthogonalize(self, grads, bufs, group):
        """Nesterov and Newton-Schulz of this rank's share of one shape's n matrices (all n in one process),
        then an all_gather. Returns (the updates, (>= n, rows, cols): the n in order, then any padding;
        the gather's work to wait on, or None)."""
        n = len(grads)
        share = -(-n // self.world)
        lo, hi = min(n, self.rank * share), min(n, (self.rank + 1) * share)
        updates = []
        if hi > lo:
            updates = list(torch._foreach_lerp(grads[lo:hi], bufs[lo:hi], group["momentum"])
                           if group["nesterov"] else bufs[lo:hi])
        updates += [torch.zeros_like(grads[0])] * (share - len(updates))  # Newton-Schulz keeps zeros zero
        local = zeropower_via_newtonschulz5(torch.stack(updates), group["ns_steps"])
        if self.world == 1:
            return local, None
        local = local.contiguous()  # NCCL gathers contiguous tensors only (a no-op unless NS's layout changes)
        gathered = local.new_empty((self.world * share, *local.shape[1:]))  # rank r's share at [r * share:]
        # torch 2.13 renames this all_gather_single (and warns); 2.11, our minimum, has only this name
        work = dist.all_gather_into_tensor(gathered, local, group=self.process_group, async_op=True)
        return gathered, work


def setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0,
                     device_type="cpu", shard_muon=None):
    """Returns [adamw, muon]. AdamW learning rates scale as 1/sqrt(model_dim / 768), as in nanochat.
    Each group remembers its base lr as 'initial_lr' for the schedule. shard_muon: split Muon's
    Newton-Schulz over the ranks (None: when torch.distributed runs more than one process)."""
    model_dim = model.config.n_embd
    matrix_params = list(model.transformer.h.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    lm_head_params = list(model.lm_head.parameters())
    n_assigned = len(matrix_params) + len(embedding_params) + len(lm_head_params)
    assert n_assigned == len(list(model.parameters())), "every parameter must belong to one optimizer"
    dmodel_lr_scale = (model_dim / 768) ** -0.5
    adam_groups = [
        dict(params=lm_head_params, lr=unembedding_lr * dmodel_lr_scale),
        dict(params=embedding_params, lr=embedding_lr * dmodel_lr_scale),
    ]
    adamw = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                              fused=device_type == "cuda")
    if shard_muon is None:
        shard_muon = dist.is_initialized() and dist.get_world_size() > 1
    muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay, shard=shard_muon)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup to 1, constant, then linear warmdown to final_lr_frac over the last warmdown_ratio."""
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / max(warmdown_steps, 1)
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step):
    """Muon momentum warms up from 0.85 to 0.95 over the first 300 steps (as in nanochat)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95
