"""
Generate text from a base-model checkpoint with a KV cache:
    python -m scripts.base_sample --model-tag d4 --prompt "def main(" --max-tokens 64
"""

import argparse
import os

import torch

from nanochat.checkpoint import load_model_for_inference, tokenizer_need
from nanochat.common import UserError, autodetect_device_type, check_device_type, get_base_dir, run_main
from nanochat.tokenizer import get_tokenizer


def main():
    p = argparse.ArgumentParser(description="Sample from a base-model checkpoint", allow_abbrev=False)
    p.add_argument("--model-tag", type=str, required=True, help="checkpoint directory name, e.g. d12")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--prompt", type=str, default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate, >= 1")
    p.add_argument("--temperature", type=float, default=0.8, help=">= 0 (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens, >= 1 (0 = all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    args = p.parse_args()
    for ok, msg in [(args.max_tokens >= 1, f"--max-tokens must be >= 1 (got {args.max_tokens})"),
                    (args.temperature >= 0, f"--temperature must be >= 0, 0 for greedy (got {args.temperature})"),
                    (args.top_k >= 0, f"--top-k must be >= 1, or 0 for no top-k filtering (got {args.top_k})"),
                    (args.step is None or args.step >= 0, f"--step must be a saved step (got {args.step})")]:
        if not ok:
            raise UserError(msg)
    device_type = args.device_type or autodetect_device_type()
    check_device_type(device_type)
    device = torch.device(device_type)
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag)
    model, meta = load_model_for_inference(checkpoint_dir, args.step, device)
    tokenizer = get_tokenizer(need=tokenizer_need(meta, checkpoint_dir))
    tokens = tokenizer.encode(args.prompt, prepend=tokenizer.get_bos_token_id())
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.no_grad()
    with autocast:
        new = list(model.generate(tokens, args.max_tokens, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed))
    print(tokenizer.decode(tokens[1:] + new))


if __name__ == "__main__":
    run_main(main)
