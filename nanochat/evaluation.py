"""Evaluations the trainer and scripts/base_eval.py share: val bits per byte and greedy samples."""

import math
import time

import torch
import torch.distributed as dist

SAMPLE_PROMPTS = ["The capital of France is", "def main(", "import "]


@torch.no_grad()
def evaluate_bpb(model, loader, steps, token_bytes, autocast_ctx, log=None):
    """Bits per byte on `steps` batches: summed nats over summed UTF-8 bytes of the targets
    (special tokens count 0 bytes and are left out), summed across ranks. log: progress every ~10%."""
    total_nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    t0 = time.time()
    for i in range(steps):
        if log and i and i % max(1, steps // 10) == 0:
            log(f"val bpb: batch {i}/{steps} ({time.time() - t0:.1f}s)")
        x, y = loader.next_batch()
        with autocast_ctx:
            loss = model(x, y, loss_reduction="none").view(-1)
        nbytes = token_bytes[y.view(-1)]
        total_nats += (loss.double() * (nbytes > 0)).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    return (total_nats / (math.log(2) * total_bytes.clamp(min=1))).item()


def sample_text(model, tokenizer, max_tokens=32):
    out = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        new = list(model.generate(tokens, max_tokens=max_tokens, temperature=0.0))
        out.append(tokenizer.decode(tokens[1:] + new))
    return out
