"""
Export a sparse checkpoint with its 2:4 MLP weights compressed (safetensors), check it, report sizes:
    python -m scripts.export_sparse --model-tag d12 [--step N] [--dtype bfloat16] [--out path.safetensors]
"""

import argparse
import os

import torch

from nanochat.accel.sparse_export import export_sparse_model, load_sparse_export
from nanochat.checkpoint import load_model_for_inference
from nanochat.common import UserError, get_base_dir, run_main


def main():
    p = argparse.ArgumentParser(description="Export a 2:4 sparse checkpoint for inference", allow_abbrev=False)
    p.add_argument("--model-tag", required=True)
    p.add_argument("--step", type=int, default=None, help="default: latest")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default=None, help="default: <checkpoint dir>/model_sparse.safetensors")
    args = p.parse_args()
    ckpt_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag)
    model, meta = load_model_for_inference(ckpt_dir, args.step, "cpu")
    if not meta.get("sparse"):
        raise UserError(f"checkpoint in {ckpt_dir} was not trained with --sparse: nothing to compress")
    out = args.out or os.path.join(ckpt_dir, "model_sparse.safetensors")
    dense, compressed = export_sparse_model(model, out, getattr(torch, args.dtype))
    # check: the exported model computes what the training-time masked model computes
    x = torch.randint(0, model.config.vocab_size, (1, min(64, model.config.sequence_len)))
    with torch.no_grad():
        err = (load_sparse_export(out)(x) - model(x)).abs().max().item()
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    print(f"2:4 MLP weights: {dense / 1e6:.1f} MB dense -> {compressed / 1e6:.1f} MB compressed "
          f"({compressed / dense:.1%}); max |logit difference| after reload: {err:.2e}")


if __name__ == "__main__":
    run_main(main)
