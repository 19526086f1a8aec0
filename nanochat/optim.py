"""
Optimizers: Muon for the transformer's hidden 2-D matrices, AdamW for embeddings and lm_head,
and the learning-rate schedule (linear warmup, constant, linear warmdown).
"""

import torch


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
    Parameters of one shape are stacked and orthogonalized in one batched call."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for shape, params in by_shape.items():
                grads = torch.stack([p.grad for p in params])
                bufs = []
                for p in params:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    bufs.append(state["momentum_buffer"])
                buf = torch.stack(bufs)
                buf.lerp_(grads, 1 - group["momentum"])
                update = grads.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz5(update, steps=group["ns_steps"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for i, p in enumerate(params):
                    self.state[p]["momentum_buffer"].copy_(buf[i])
                    if group["weight_decay"] > 0:
                        p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update[i].to(p.dtype), alpha=-group["lr"] * scale)


def setup_optimizers(model, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, weight_decay=0.0,
                     device_type="cpu"):
    """Returns [adamw, muon]. AdamW learning rates scale as 1/sqrt(model_dim / 768), as in nanochat.
    Each group remembers its base lr as 'initial_lr' for the schedule."""
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
    muon = Muon(matrix_params, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
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
