"""
Evaluate a base-model checkpoint: the CORE metric (DCLM), val bits per byte, greedy samples.
    python -m scripts.base_eval --download-bundle      # once: the DCLM eval bundle -> <base>/eval_bundle
    python -m scripts.base_eval --model-tag d12 [--step N] [--eval core,bpb,sample] [--max-per-task 500]
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --model-tag d26
Dense, --sparse (the 2:4 masks are recomputed from the saved weights) and --fp8 checkpoints (saved as
plain weights, evaluated in bf16 like upstream's eval) all load the same way. Results go to
<base>/report/<tag>_eval_<step>.json and .md (or --out-dir). GPT-2 1.5B scores CORE 0.2565.
"""

import argparse
import datetime
import os
import sys
from contextlib import nullcontext

import torch

from nanochat.common import (UserError, autodetect_device_type, compute_cleanup, compute_init, get_base_dir,
                             get_dist_info, print0, run_main)
from nanochat.flags import CPU_EVAL_TOKENS, GPU_EVAL_TOKENS, strip_separator

EVALS = ("core", "bpb", "sample")


def build_arg_parser():
    p = argparse.ArgumentParser(description="Evaluate a base-model checkpoint: CORE, val bpb, samples", allow_abbrev=False)
    p.add_argument("--model-tag", type=str, default="", help="checkpoint directory name, e.g. d12")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--eval", type=str, default="core,bpb,sample", help="comma-separated: core, bpb, sample")
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per CORE task (-1 = all)")
    p.add_argument("--device-batch-size", type=int, default=-1,
                   help="sequences per forward for bpb; CORE batches up to this x seq len tokens (-1 = the training run's)")
    p.add_argument("--eval-tokens", type=int, default=-1,
                   help=f"tokens for val bpb (-1 = the training run's --eval-tokens, on CPU at most {CPU_EVAL_TOKENS:,})")
    p.add_argument("--device-type", type=str, default="", help="cuda|cpu|mps (empty = autodetect)")
    p.add_argument("--bundle-dir", type=str, default="", help="the eval bundle (default <base>/eval_bundle)")
    p.add_argument("--out-dir", type=str, default="", help="where the JSON and markdown go (default <base>/report)")
    p.add_argument("--download-bundle", action="store_true", help="fetch and unpack the DCLM eval bundle, then exit")
    p.add_argument("--bundle-url", type=str, default="", help="where --download-bundle fetches from (file:// works)")
    return p


def parse_evals(spec):
    evals = [e.strip() for e in spec.split(",") if e.strip()]
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        bad = ",".join(unknown) or repr(spec)
        raise UserError(f"unknown --eval {bad}: use a comma-separated subset of {','.join(EVALS)}")
    return evals


def evaluate(args):
    """Evaluate per `args` (from build_arg_parser). Returns the results dict (also written as JSON on rank 0)."""
    from nanochat import core_eval
    from nanochat.checkpoint import load_model_for_inference, tokenizer_need
    from nanochat.dataloader import DistributedDataLoader
    from nanochat.evaluation import evaluate_bpb, sample_text
    from nanochat.report import core_line, write_eval_report
    from nanochat.storage import REPORT_BYTES, check_writable
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    if args.bundle_url and not args.download_bundle:
        raise UserError("--bundle-url is where --download-bundle fetches the eval bundle from: add --download-bundle "
                        "(then evaluate with --bundle-dir, or the default <base>/eval_bundle)")
    if args.download_bundle:
        if get_dist_info()[1] == 0:
            core_eval.download_bundle(args.bundle_dir or None, args.bundle_url or core_eval.BUNDLE_URL)
        return {}
    evals = parse_evals(args.eval)
    if not args.model_tag:
        raise UserError("--model-tag is required: the checkpoint directory name under base_checkpoints, e.g. d12")
    # A missing bundle fails before anything is loaded.
    tasks = core_eval.load_tasks(args.bundle_dir or None, args.max_per_task) if "core" in evals else None

    device_type = args.device_type or autodetect_device_type()
    is_ddp, rank, _, world_size, device = compute_init(device_type)
    if device_type == "cpu":
        torch.set_flush_denormal(True)  # as the trainer does: its eval numbers, at its speed
    autocast_ctx = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    out_dir = args.out_dir or os.path.join(get_base_dir(), "report")
    if rank == 0:  # a report that cannot be written fails now, not after the evaluation
        check_writable(out_dir, REPORT_BYTES, "report directory")
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag)
    model, meta = load_model_for_inference(checkpoint_dir, args.step, device)
    tokenizer = get_tokenizer(need=tokenizer_need(meta, checkpoint_dir))
    train_args = meta.get("args", {})
    B = args.device_batch_size if args.device_batch_size > 0 else train_args.get("device_batch_size", 32)
    T = meta["model_config"]["sequence_len"]
    print0(f"evaluating {checkpoint_dir} step {meta['step']} ({', '.join(evals)}) on {world_size} x {device_type}")
    results = dict(model_tag=args.model_tag, step=meta["step"], checkpoint_dir=checkpoint_dir,
                   sparse=bool(meta.get("sparse")), fp8=bool(meta.get("fp8")), world_size=world_size,
                   device=torch.cuda.get_device_name(device) if device_type == "cuda" else device_type,
                   date=datetime.datetime.now().isoformat(timespec="seconds"))

    if "core" in evals:
        core = core_eval.CoreEval(tasks, tokenizer, model.rotary_seq_len, B * T)
        with autocast_ctx:
            results["core"] = core.evaluate(model, device)
        for label, r in results["core"]["tasks"].items():
            print0(f"{label:<36} {r['type']:<18} {r['num_fewshot']:>2}-shot  accuracy {r['accuracy']:.4f}  "
                   f"centered {r['centered']:.4f}")
        print0(f"{core_line(results['core'])} in {results['core']['seconds']:.1f}s")
    if "bpb" in evals:
        eval_tokens = args.eval_tokens if args.eval_tokens > 0 else (train_args.get("eval_tokens") or GPU_EVAL_TOKENS)
        if args.eval_tokens <= 0 and device_type == "cpu" and eval_tokens > CPU_EVAL_TOKENS:
            print0(f"val bpb on CPU: {CPU_EVAL_TOKENS:,} tokens, not the run's {eval_tokens:,} (--eval-tokens N for more)")
            eval_tokens = CPU_EVAL_TOKENS
        steps = max(1, eval_tokens // (B * T * world_size))  # the trainer's count: same B and ranks, same number
        loader = DistributedDataLoader(tokenizer, B, T, "val", device, rank=rank, world_size=world_size)
        val_bpb = evaluate_bpb(model, loader, steps, get_token_bytes(device), autocast_ctx, log=print0)
        results["bpb"] = dict(val=val_bpb, tokens=steps * B * T * world_size)
        print0(f"val bpb {val_bpb:.4f} ({steps * B * T * world_size:,} tokens)")
    if "sample" in evals and rank == 0:
        with autocast_ctx:
            results["samples"] = sample_text(model, tokenizer)
        for s in results["samples"]:
            print0(f"sample: {s!r}")
    if rank == 0:
        paths = write_eval_report(out_dir, results)
        print0(f"results: {paths[0]}, {paths[1]}")
    compute_cleanup()
    return results


def main():
    evaluate(build_arg_parser().parse_args(strip_separator(sys.argv[1:])))


if __name__ == "__main__":
    run_main(main)
