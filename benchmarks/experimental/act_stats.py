"""
How sparse the MLP's relu² output is, per layer: what 2:4 activation sparsity (--sparse-act) would work with.

h = relu(c_fc(x))² is the input of c_proj, shape (tokens, 4d). A 2:4 GEMM with h as the sparse operand
needs at most 2 non-zeros in every group of 4 consecutive features of a token (along 4d, c_proj's
reduction dimension). Per layer, over the tokens seen:
  zero_frac        fraction of exact zeros in h
  nnz_hist         fraction of 4-groups holding 0, 1, 2, 3, 4 non-zeros
  groups_le2_frac  fraction of 4-groups with <= 2 non-zeros: 2:4 pruning leaves them as they are
  dropped_l2_frac  share of sum(h²) that keeping the 2 largest of every 4 drops
  dropped_l1_frac  the same share of sum(|h|)
  out_rel_err      ||c_proj(h - prune(h))|| / ||c_proj(h)|| over all tokens: the error the pruning puts into
                   the MLP's output (None while c_proj is all zeros, as at init, or when it is not a plain Linear)

Forward hooks on each block's mlp.c_proj read h under torch.no_grad; the model code is not changed and,
unless prune=True, neither is anything it computes. With prune=True the hooks hand c_proj the pruned h
instead, which is what the model would compute with every MLP's activation pruned 2:4.
"""

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP = 4  # a 2:4 group: 4 consecutive features of one token, at most 2 of them kept
CHUNK_ROWS = 8192  # tokens per chunk: bounds the temporaries at d12 (65k tokens x 3072 features per batch)


def prune_2of4(h):
    """Keep the 2 largest |h| of every 4 consecutive features along the last dim, zero the other 2.
    A group with <= 2 non-zeros comes back unchanged (ties among its zeros drop zeros)."""
    g = h.reshape(*h.shape[:-1], h.shape[-1] // GROUP, GROUP)
    keep = torch.zeros(g.shape, dtype=torch.bool, device=h.device).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return torch.where(keep, g, torch.zeros((), dtype=h.dtype, device=h.device)).reshape(h.shape)


def new_sums(device="cpu"):
    """The raw float64 counters that group_sums adds to: kept apart from the fractions so batches add up exactly."""
    z = lambda: torch.zeros((), dtype=torch.float64, device=device)
    return dict(values=z(), zeros=z(), nnz_counts=torch.zeros(GROUP + 1, dtype=torch.float64, device=device),
                sq=z(), sq_dropped=z(), abs=z(), abs_dropped=z())


@torch.no_grad()
def group_sums(h, sums=None, chunk_rows=CHUNK_ROWS):
    """Add h's counts to `sums` (new_sums() when None) and return it. h: (..., F) with F a multiple of 4;
    every leading index is one token. Computed in float32 whatever h's dtype (bf16 under autocast)."""
    rows = h.reshape(-1, h.shape[-1])
    if rows.shape[-1] % GROUP:
        raise ValueError(f"the feature dim ({rows.shape[-1]}) must be a multiple of {GROUP}")
    sums = new_sums(h.device) if sums is None else sums
    for chunk in rows.split(chunk_rows):
        a = chunk.float().abs().reshape(chunk.shape[0], -1, GROUP)  # (tokens, F/4, 4)
        nnz = (a != 0).sum(-1)  # (tokens, F/4)
        low2 = a.sort(dim=-1).values[..., :2]  # the 2 smallest of each group: what top-2-of-4 drops
        sums["values"] += a.numel()
        sums["zeros"] += a.numel() - nnz.sum()
        sums["nnz_counts"] += torch.bincount(nnz.flatten(), minlength=GROUP + 1).double()
        sums["sq"] += a.square().sum(dtype=torch.float64)
        sums["sq_dropped"] += low2.square().sum(dtype=torch.float64)
        sums["abs"] += a.sum(dtype=torch.float64)
        sums["abs_dropped"] += low2.sum(dtype=torch.float64)
    return sums


def fractions(sums):
    """The per-layer numbers of the module docstring from group_sums' counters."""
    s = {k: v.cpu().tolist() for k, v in sums.items()}
    groups = sum(s["nnz_counts"])
    ratio = lambda num, den: num / den if den else None
    return dict(zero_frac=ratio(s["zeros"], s["values"]),
                nnz_hist=[ratio(c, groups) for c in s["nnz_counts"]],
                groups_le2_frac=ratio(sum(s["nnz_counts"][:3]), groups),
                dropped_l2_frac=ratio(s["sq_dropped"], s["sq"]),
                dropped_l1_frac=ratio(s["abs_dropped"], s["abs"]))


def mlp_projections(model):
    """Each block's mlp.c_proj, whose input is the relu² output h (a GPT's layers in order)."""
    return [block.mlp.c_proj for block in model.transformer.h]


class ActSparsity:
    """Context manager: hooks on `projections` (modules whose input is h, e.g. mlp_projections(model)) that
    accumulate h's sparsity counts; with prune=True they also replace h by prune_2of4(h). Hooks on the eager
    modules: a compiled model must be measured through the module it wraps. result() -> one dict per layer."""

    def __init__(self, projections, prune=False):
        self.projections = list(projections)
        self.prune = prune
        self.sums = [None] * len(self.projections)
        self.err_sq = [0.0] * len(self.projections)  # sum over tokens of ||c_proj(h - prune(h))||²
        self.out_sq = [0.0] * len(self.projections)  # sum over tokens of ||c_proj(h)||²
        self.tokens = [0] * len(self.projections)
        self._handles = []

    def _pre_hook(self, i):
        def hook(module, args):
            (h,) = args
            self.sums[i] = group_sums(h, self.sums[i])
            self.tokens[i] += h.numel() // h.shape[-1]
            if self.prune:
                return (prune_2of4(h),)
            if type(module) is nn.Linear:  # the dense layer: c_proj is linear, so the error is c_proj(dropped)
                dropped = (h - prune_2of4(h)).float()
                with torch.autocast(h.device.type, enabled=False):  # fp32, not the bf16 autocast would pick
                    err = F.linear(dropped, module.weight.float())
                self.err_sq[i] += err.square().sum(dtype=torch.float64).item()
            return None
        return hook

    def _post_hook(self, i):
        def hook(module, args, out):
            if not self.prune and type(module) is nn.Linear:
                self.out_sq[i] += out.float().square().sum(dtype=torch.float64).item()
        return hook

    def __enter__(self):
        for i, m in enumerate(self.projections):
            self._handles.append(m.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(m.register_forward_hook(self._post_hook(i)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def result(self):
        out = []
        for i, sums in enumerate(self.sums):
            r = dict(layer=i, tokens=self.tokens[i], **fractions(sums if sums is not None else new_sums()))
            r["out_rel_err"] = (self.err_sq[i] / self.out_sq[i]) ** 0.5 \
                if self.out_sq[i] > 0 and not self.prune and type(self.projections[i]) is nn.Linear else None
            out.append(r)
        return out


@torch.no_grad()
def measure(model, batches, autocast_ctx=None):
    """Per-layer sparsity of h over `batches` ([(x, y), ...] token tensors on the model's device), and the
    mean loss (nats/token) with h as is and with every layer's h pruned 2:4. Two forward passes per batch.
    Returns {"layers": [per-layer dict], "loss": float, "loss_pruned": float, "tokens": int}."""
    autocast_ctx = autocast_ctx or nullcontext()
    was_training = model.training
    model.eval()
    losses = {}
    try:
        for prune in (False, True):
            with ActSparsity(mlp_projections(model), prune=prune) as stats:
                total, count = 0.0, 0
                for x, y in batches:
                    with autocast_ctx:
                        loss = model(x, y, loss_reduction="none")
                    total += loss.double().sum().item()
                    count += loss.numel()
            losses[prune] = total / count
            if not prune:
                layers = stats.result()
    finally:
        model.train(was_training)
    return dict(layers=layers, loss=losses[False], loss_pruned=losses[True], tokens=count)
