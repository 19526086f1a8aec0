"""
The model's loss: lm_head matmul, tanh soft-cap and cross-entropy over the vocabulary, in chunks of
tokens, so that the (tokens x vocab) fp32 logits of a whole micro-batch never exist at once.

At depth 26 and device batch 16 one fp32 logits tensor is 32768 tokens x 32768 vocab x 4 B = 4 GiB,
and the plain formula keeps several of them (logits, soft-capped logits, log-softmax, their grads).
Here each chunk of tokens computes its logits, its losses and, when a gradient is wanted, the
gradients of the loss w.r.t. the hidden states and the lm_head weight right away ("grad in
forward", as fused linear-cross-entropy kernels do); only those small results are kept, and
backward just scales them by the incoming gradient. No FLOPs are added: the same three matmuls
(logits, grad-input, grad-weight) run, in pieces.

Numerics are the plain formula's (reference_linear_softcap_cross_entropy): the matmuls run in the
autocast dtype when autocast is on (bf16 on CUDA), in the inputs' dtype otherwise; logits, soft-cap,
softmax and losses are fp32; grad-logits are cast to the matmul dtype for the two gradient matmuls.
The only differences are the order of sums (per-chunk grad-weight partials are added in fp32).
"""

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 4096 tokens x 32768 vocab = 512 MiB in fp32


def default_chunk_size(vocab_size):
    """Tokens per chunk: CHUNK_ELEMENTS logits (4096 tokens at nanochat's 32768 vocab)."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def reference_linear_softcap_cross_entropy(x, weight, targets, softcap, ignore_index=-1, reduction="mean"):
    """The plain formula, materializing all logits: what the model computed before chunking.
    Tests and benchmarks compare against it."""
    logits = F.linear(x, weight).float()
    logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


def _chunk(x, w, targets, softcap, ignore_index, row_scale=None):
    """One chunk. x (C, d) and w (V, d) are in the matmul dtype. Returns the per-token losses (C,)
    in fp32 (0 where the target is ignored) and, if row_scale (C,) is given, the gradient of
    sum_i row_scale_i * loss_i w.r.t. the pre-soft-cap logits, (C, V) in the matmul dtype."""
    t = (x @ w.t()).float().div_(softcap).tanh_()  # in place: fewer (C, V) buffers in eager mode
    z = softcap * t  # soft-capped logits, fp32
    lse = torch.logsumexp(z, dim=1)
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, 0)[:, None]
    loss = torch.where(valid, lse - z.gather(1, tgt).squeeze(1), 0.0)
    if row_scale is None:
        return loss, None
    dz = (z - lse[:, None]).exp_()  # softmax
    # softmax - onehot, as an elementwise op (not a scatter) so that inductor fuses the whole chunk's
    # grad-logits into one kernel reading the bf16 logits and writing the bf16 result
    dz = torch.where(torch.arange(w.shape[0], device=dz.device) == tgt, dz - 1.0, dz)
    dz *= (row_scale * valid)[:, None]
    dz *= t.mul_(t).neg_().add_(1.0)  # through the soft-cap: d(softcap * tanh(l / softcap))/dl = 1 - tanh^2
    return loss, dz.to(x.dtype)


def _chunked(x, weight, targets, softcap, ignore_index, chunk_size, compute_dtype, row_scale=None):
    """Walk the tokens chunk by chunk. Returns the per-token losses (N,) fp32 and, if row_scale (N,)
    is given, the gradients of sum_i row_scale_i * loss_i w.r.t. x (N, d, x's dtype) and weight
    (V, d, weight's dtype); else (losses, None, None)."""
    N = x.shape[0]
    xc, wc = x.to(compute_dtype), weight.to(compute_dtype)
    losses = []
    gx = gw = None
    if row_scale is not None:
        gx = torch.empty_like(x)
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for s in range(0, N, chunk_size):
        e = min(s + chunk_size, N)
        loss, dlogits = _chunk(xc[s:e], wc, targets[s:e], softcap, ignore_index,
                               None if row_scale is None else row_scale[s:e])
        losses.append(loss)
        if dlogits is not None:
            gx[s:e] = dlogits @ wc
            gw += (dlogits.t() @ xc[s:e]).float()
    losses = torch.cat(losses) if len(losses) > 1 else losses[0]
    return losses, gx, (None if gw is None else gw.to(weight.dtype))


def _reduce(losses, valid, reduction):
    if reduction == "none":
        return losses
    total = losses.sum()
    return total / valid.sum() if reduction == "mean" else total


class _LinearSoftcapCrossEntropy(torch.autograd.Function):
    """mean/sum: the gradients are computed in forward and saved (N x d and V x d); backward scales
    them by grad_output. none: forward keeps x, weight, targets; backward re-walks the chunks
    with the per-token grad_output as the row weights (no grad-in-forward possible there)."""

    @staticmethod
    def forward(ctx, x, weight, targets, softcap, ignore_index, reduction, chunk_size, compute_dtype):
        valid = targets != ignore_index
        ctx.reduction = reduction
        if reduction == "none":
            ctx.args = (softcap, ignore_index, chunk_size, compute_dtype)
            ctx.save_for_backward(x, weight, targets)
            return _chunked(x, weight, targets, softcap, ignore_index, chunk_size, compute_dtype)[0]
        row_scale = valid / valid.sum() if reduction == "mean" else valid.float()
        losses, gx, gw = _chunked(x, weight, targets, softcap, ignore_index, chunk_size, compute_dtype, row_scale)
        ctx.save_for_backward(gx, gw)
        return _reduce(losses, valid, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            x, weight, targets = ctx.saved_tensors
            softcap, ignore_index, chunk_size, compute_dtype = ctx.args
            _, gx, gw = _chunked(x, weight, targets, softcap, ignore_index, chunk_size, compute_dtype,
                                 row_scale=grad_out.float())
        else:
            gx, gw = ctx.saved_tensors
            gx, gw = gx * grad_out.to(gx.dtype), gw * grad_out.to(gw.dtype)
        return gx, gw, None, None, None, None, None, None


def linear_softcap_cross_entropy(x, weight, targets, softcap, ignore_index=-1, reduction="mean", chunk_size=None):
    """cross_entropy(softcap * tanh((x @ weight^T).float() / softcap), targets) without full logits.
    x: (N, d) hidden states, weight: (V, d) (lm_head), targets: (N,) int64, ignore_index as in
    F.cross_entropy. reduction: "mean" (over non-ignored targets), "sum" or "none" (per-token, 0 where
    ignored). chunk_size: tokens per chunk (default: default_chunk_size(V)). Differentiable w.r.t.
    x and weight; honours autocast (the matmuls run in its dtype, everything after in fp32)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}")
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    dev = x.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearSoftcapCrossEntropy.apply(x, weight, targets, softcap, ignore_index, reduction, chunk_size,
                                                compute_dtype)
    losses = _chunked(x, weight, targets, softcap, ignore_index, chunk_size, compute_dtype)[0]
    return _reduce(losses, targets != ignore_index, reduction)
