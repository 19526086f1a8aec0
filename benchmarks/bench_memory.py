"""
Peak memory of the real trainer (nanochat.train.train) per depth x mode x device batch size, with the
chunked loss (nanochat/loss.py, what the model uses) or the old full-logits formula ("reference",
patched in for this measurement only). Each configuration runs a few optimizer steps in its own
process (a clean peak, and an out-of-memory error costs only that row). With at least 2 micro-batches
per step the gradients already exist while a micro-batch runs forward and backward, as in a real run
(--total-batch-size 524288 at device batch 16 is 16 micro-batches); the optimizer states exist from
step 2 on, so the default 3 steps reach the steady peak.

    NANOCHAT_BASE_DIR=... python -m benchmarks.bench_memory --depths 26 --device-batch-sizes 16 8 \\
        --modes dense sparse fp8 fp8_sparse --loss chunked reference --out out/memory_d26

Peak = torch.cuda.max_memory_allocated (and max_memory_reserved, what the allocator held) on CUDA,
the process's peak RSS elsewhere. --partitioner measures variants of torch._functorch.config for the
compiled model: ban_recompute_materialized_backward=False lets it recompute relu^2, the bf16 casts of
the norm outputs and of q/k in backward instead of saving them (-18 bytes per token x dim per layer in
the CPU analysis below, about -24 GiB of saved activations at d26 device batch 16).
--snapshot DEPTH:MODE:BATCH[:LOSS[:PARTITIONER]] also records the allocator's
history of the matching configuration and writes <out>_snapshot_<config>_peak.md (the largest live
allocations at the peak, by source line) and _summary.txt (torch.cuda.memory_summary) (add --snapshot-pickle for the full
torch.cuda.memory._snapshot(), readable at https://pytorch.org/memory_viz).
--saved-activations runs nothing on the GPU: it compiles a 2-layer model of a given width on CPU
(bf16 autocast, inductor's decompositions and partitioner) and lists what the forward keeps for the
backward, in bytes per token x model dim per layer.

Needs data shards and a tokenizer under NANOCHAT_BASE_DIR (as benchmarks/bench_train.py).
Writes <out>.json and <out>.md; train() is also callable in-process through measure() (tests, CPU).
"""

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import traceback

from benchmarks import common_args as common
from benchmarks.bench_train import DEFAULT_MODES, MODES, trainer_flags

LOSSES = ("chunked", "reference")
GIB = 1024**3


def config_flags(depth, mode, device_batch_size, steps=3, seq_len=2048, micro_batches=2, extra=()):
    """Trainer flags for one configuration (bench_train's, so both benchmarks run the same trainer)."""
    flags = trainer_flags(depth, mode, steps, device_batch_size, seq_len, device_batch_size * seq_len * micro_batches)
    flags[flags.index("--model-tag") + 1] = f"mem_d{depth}_{mode}_b{device_batch_size}"
    # --partitioner, not the trainer's --recompute auto, decides what the compiled forward keeps
    return flags + ["--recompute", "off"] + list(extra)


def _use_loss(loss):
    """Point the model's loss at the chunked path (the default) or the old full-logits formula."""
    import nanochat.gpt
    import nanochat.loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: use one of {LOSSES}")
    nanochat.gpt.linear_softcap_cross_entropy = (nanochat.loss.linear_softcap_cross_entropy if loss == "chunked"
                                                 else nanochat.loss.reference_linear_softcap_cross_entropy)


def parse_partitioner(variant):
    """'default' -> {}; 'key=value,key=value' -> torch._functorch.config settings, e.g.
    ban_recompute_materialized_backward=False (let the partitioner recompute cheap elementwise ops,
    such as relu^2 and the bf16 casts of norm outputs, in backward instead of saving them)."""
    import ast
    if variant in (None, "", "default"):
        return {}
    out = {}
    for item in variant.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = ast.literal_eval(value.strip())
    return out


def _set_partitioner(settings):
    """Apply torch._functorch.config settings; returns the previous values (to restore)."""
    import torch._functorch.config as fconfig
    old = {}
    for key, value in settings.items():
        if not hasattr(fconfig, key):
            raise ValueError(f"torch._functorch.config has no setting {key!r}")
        old[key] = getattr(fconfig, key)
        setattr(fconfig, key, value)
    return old


def measure(flags, loss="chunked", snapshot_prefix=None, snapshot_pickle=False, partitioner=None):
    """Train with these flags in this process and return the row's measured fields: peak_memory_gib,
    peak_reserved_gib (CUDA), oom, error, tok_per_sec (rough: mean of steps 2+, the first compiles),
    final_loss. On CPU the peak is the process's peak RSS (meaningful in a fresh process only).
    partitioner: torch._functorch.config settings for the compiled model (see parse_partitioner)."""
    import torch
    from nanochat.flags import build_arg_parser
    from nanochat.metrics import peak_memory_gib
    from nanochat.train import train
    args = build_arg_parser().parse_args(flags)
    cuda = (args.device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    _use_loss(loss)
    old_partitioner = _set_partitioner(partitioner or {})
    row = dict(oom=False, error=None, tok_per_sec=None, final_loss=None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if snapshot_prefix:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    try:
        out = train(args)
        tps = out["history"]["tok_per_sec"][1:]
        row.update(tok_per_sec=sum(tps) / len(tps) if tps else None, final_loss=out["summary"]["final_loss"])
    except RuntimeError as e:  # torch.OutOfMemoryError, or an OOM re-raised by compiled code
        if "out of memory" not in str(e).lower():
            raise
        row.update(oom=True, error=str(e).strip().splitlines()[0][:300])
    finally:
        _use_loss("chunked")
        _set_partitioner(old_partitioner)
    if cuda:
        row.update(peak_memory_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                   gpu_total_gib=torch.cuda.get_device_properties(0).total_memory / GIB)
        if snapshot_prefix:
            write_snapshot(snapshot_prefix, snapshot_pickle)
    else:
        row.update(peak_memory_gib=peak_memory_gib(torch.device("cpu")), peak_reserved_gib=None, gpu_total_gib=None)
    return row


# -----------------------------------------------------------------------------
# What is live at the peak (CUDA)

def _site(frames):
    """The first frame that says where an allocation comes from: project code or generated (inductor) code."""
    for f in frames:
        name = f.get("filename", "")
        if "/nanochat/" in name or "/benchmarks/" in name or "torchinductor" in name or "/torch/optim/" in name:
            return f"{name.split('/')[-1]}:{f.get('line')} ({f.get('name')})"
    return f"{frames[0].get('filename', '?').split('/')[-1]}:{frames[0].get('line')} ({frames[0].get('name')})" if frames else "?"


def peak_allocations(snapshot, top=25):
    """Replay the allocator's trace (recorded from the start of the run) to the moment allocated bytes
    peaked; returns (peak bytes, [(site, bytes, count, largest)]) of the allocations live then."""
    events = [ev for trace in snapshot.get("device_traces", []) for ev in trace]

    def replay(stop):
        live, cur, peak, peak_at = {}, 0, 0, -1
        for i, ev in enumerate(events[:stop]):
            action, addr = ev.get("action"), ev.get("addr")
            if action == "alloc":
                live[addr] = (ev.get("size", 0), ev.get("frames", []))
                cur += live[addr][0]
                if cur > peak:
                    peak, peak_at = cur, i
            elif action == "free_completed" and addr in live:
                cur -= live.pop(addr)[0]
        return live, peak, peak_at

    _, peak, peak_at = replay(len(events))
    at_peak = replay(peak_at + 1)[0]  # the allocations live right after the peak's allocation
    sites = {}
    for size, frames in at_peak.values():
        s = sites.setdefault(_site(frames), [0, 0, 0])
        s[0] += size
        s[1] += 1
        s[2] = max(s[2], size)
    return peak, sorted(((k, *v) for k, v in sites.items()), key=lambda r: -r[1])[:top]


def write_snapshot(prefix, with_pickle=False):
    import torch
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, sites = peak_allocations(snap)
    lines = [f"Live allocations at the peak of the recorded trace: {peak / GIB:.2f} GiB "
             f"(max_memory_allocated {torch.cuda.max_memory_allocated() / GIB:.2f} GiB)", "",
             "| GiB | count | largest MiB | first project / generated frame |", "|---|---|---|---|"]
    lines += [f"| {b / GIB:.2f} | {n} | {big / 2**20:.0f} | {site} |" for site, b, n, big in sites]
    with open(prefix + "_peak.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(prefix + "_summary.txt", "w") as f:
        f.write(torch.cuda.memory_summary())
    if with_pickle:
        import pickle
        with open(prefix + ".pickle", "wb") as f:
            pickle.dump(snap, f)


# -----------------------------------------------------------------------------
# What the compiled forward saves for the backward (CPU, no GPU needed)

def saved_activations(n_embd=1664, seq_len=512, vocab_size=32768, head_dim=128, loss="chunked", partitioner=None):
    """Compile a 2-layer GPT of width n_embd on CPU under bf16 autocast with inductor's decompositions
    and min-cut partitioner (no code generation) and list the tensors its forward saves for the
    backward. Returns dict(rows=[(name, shape, dtype, bytes per token x dim)] of one block,
    per_layer=bytes per token x dim per layer, vocab_bytes_per_token, weight_bytes: the rest, e.g. bf16
    copies of the weights and the lm_head gradient; the graph's own inputs, such as the fp32 weights,
    are not counted: saving them costs nothing).
    CPU autocast and CPU attention differ a little from CUDA: a guide, the GPU peak is the measure."""
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table
    from nanochat.gpt import GPT, GPTConfig

    torch._dynamo.reset()
    cfg = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=2, n_head=n_embd // head_dim,
                    n_kv_head=n_embd // head_dim, n_embd=n_embd)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    saved = []

    def fw_compiler(gm, _):
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        for node in out:
            v = getattr(node, "meta", {}).get("val")
            if isinstance(v, torch.Tensor) and node.op != "placeholder":  # inputs (weights, idx) cost nothing extra
                saved.append((node.name, tuple(v.shape), str(v.dtype).replace("torch.", ""), v.numel() * v.element_size()))
        return gm.forward

    backend = aot_autograd(fw_compiler=fw_compiler, bw_compiler=lambda gm, _: gm.forward,
                           partition_fn=min_cut_rematerialization_partition, decompositions=select_decomp_table())
    _use_loss(loss)
    old_partitioner = _set_partitioner(partitioner or {})
    try:
        idx = torch.randint(0, vocab_size, (1, seq_len))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.compile(model, backend=backend, dynamic=False)(idx, idx)
    finally:
        _use_loss("chunked")
        _set_partitioner(old_partitioner)
        torch._dynamo.reset()
    N, d = seq_len, n_embd
    assert N not in (n_embd, 4 * n_embd, vocab_size, head_dim), "seq_len must differ from every width"
    rows, per_token, vocab, weights = [], 0, 0, 0
    for name, shape, dtype, nbytes in saved:
        if N in shape and vocab_size in shape:
            vocab += nbytes
        elif N in shape:  # per-token tensors: activations (seq_len is chosen unlike every width)
            per_token += nbytes
            rows.append((name, shape, dtype, nbytes / (N * d)))
        else:
            weights += nbytes
    return dict(rows=rows, per_layer=per_token / (N * d) / cfg.n_layer, vocab_bytes_per_token=vocab / N,
                weight_bytes=weights)


# -----------------------------------------------------------------------------
# Results

def write_outputs(results, out, meta):
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=2)
    lines = [f"# Peak memory ({meta['gpu']}, torch {meta['torch']}, {meta['date']})", "",
             f"Command: `{meta['command']}`. The real trainer, {'compiled' if meta['gpu'] != 'cpu' else 'eager'}, "
             "a few optimizer steps; peak = torch.cuda.max_memory_allocated (reserved: what the caching allocator "
             "held); on CPU the process's peak RSS. loss: chunked = nanochat/loss.py, reference = the old "
             "full-logits formula.", "",
             "| depth | mode | loss | partitioner | device batch | micro-batches | peak GiB | reserved GiB | vs reference | tok/s (rough) | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = next((x for x in results if x["loss"] == "reference" and not x.get("oom") and x.get("peak_memory_gib")
                    and all(x[k] == r[k] for k in ("depth", "mode", "device_batch_size", "partitioner"))), None)
        vs = (f"{r['peak_memory_gib'] - ref['peak_memory_gib']:+.2f} GiB"
              if ref and r["loss"] != "reference" and r.get("peak_memory_gib") and not r.get("oom") else "-")
        peak = f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") is not None else "-"
        res = f"{r['peak_reserved_gib']:.2f}" if r.get("peak_reserved_gib") is not None else "-"
        tps = f"{r['tok_per_sec']:,.0f}" if r.get("tok_per_sec") else "-"
        status = "OOM (peak before the failure)" if r.get("oom") else ("ok" if not r.get("error") else
                                                                   "failed: " + r["error"].strip().splitlines()[-1][:100])
        lines.append(f"| {r['depth']} | {r['mode']} | {r['loss']} | {r['partitioner']} | {r['device_batch_size']} | {r['micro_batches']} | "
                     f"{peak} | {res} | {vs} | {tps} | {status} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def run_child(spec, timeout, log_path):
    """One configuration in a fresh process; returns its measured fields (or an error)."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, open(log_path, "w") as log:
        out_json = os.path.join(tmp, "row.json")
        try:
            r = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--one", json.dumps(spec), out_json],
                               stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {timeout}s")
        if r.returncode != 0 or not os.path.exists(out_json):
            with open(log_path) as f:
                return dict(error=f.read()[-1500:] or f"exit code {r.returncode}")
        with open(out_json) as f:
            return json.load(f)


def run_one(spec, out_json):
    """Child process: measure one configuration and write its fields as JSON (also after an OOM)."""
    try:
        row = measure(spec["flags"], spec["loss"], spec.get("snapshot_prefix"), spec.get("snapshot_pickle", False),
                      parse_partitioner(spec.get("partitioner")))
    except Exception:
        row = dict(error=traceback.format_exc()[-1500:])
    with open(out_json, "w") as f:
        json.dump(row, f)


def print_saved_activations(n_embd, seq_len, partitioner=None):
    for loss in LOSSES:
        r = saved_activations(n_embd=n_embd, seq_len=seq_len, loss=loss, partitioner=parse_partitioner(partitioner))
        print(f"\nloss={loss}, partitioner={partitioner or 'default'}: saved for backward, per layer: {r['per_layer']:.2f} bytes per token x dim; "
              f"vocab-sized: {r['vocab_bytes_per_token']:.0f} bytes per token; other (weight-sized: bf16 weight copies, lm_head grad): {r['weight_bytes'] / 1e6:.1f} MB (2 layers)")
        if loss == "chunked":
            print("per-token tensors saved (both blocks, then the loss), bytes per token x dim:")
            for name, shape, dtype, b in r["rows"]:
                print(f"  {name:28s} {str(shape):24s} {dtype:9s} {b:5.2f}")


def build_arg_parser():
    p = common.parser(__doc__)
    common.add_depths(p, [26])
    common.add_modes(p, DEFAULT_MODES, choices=list(MODES))
    p.add_argument("--device-batch-sizes", type=int, nargs="+", default=[16])
    p.add_argument("--loss", nargs="+", default=["chunked"], choices=LOSSES, help="chunked (the model's) and/or reference (old)")
    p.add_argument("--partitioner", nargs="+", default=["default"], metavar="default|KEY=VALUE[,KEY=VALUE]",
                   help="torch._functorch.config variants to measure, e.g. default ban_recompute_materialized_backward=False")
    p.add_argument("--steps", type=int, default=3)
    common.add_seq_len(p)
    common.add_micro_batches(p, 2)  # >= 2: the grads live during forward and backward
    common.add_timeout(p, 300)
    common.add_out(p, "out/memory")
    p.add_argument("--snapshot", default=None, metavar="DEPTH:MODE:BATCH[:LOSS[:PARTITIONER]]",
                   help="record the allocator history of the matching configuration(s)")
    p.add_argument("--snapshot-pickle", action="store_true", help="with --snapshot: also dump the full snapshot pickle (large)")
    p.add_argument("--saved-activations", nargs="?", const=1664, type=int, metavar="N_EMBD",
                   help="CPU only: list what the compiled forward saves for backward at this width (default 1664 = d26), then exit")
    common.add_trainer_flags(p)
    p.add_argument("--one", nargs=2, metavar=("SPEC_JSON", "OUT_JSON"), help=argparse.SUPPRESS)
    return p


def main():
    args = build_arg_parser().parse_args()
    if args.one:
        run_one(json.loads(args.one[0]), args.one[1])
        return
    if args.saved_activations:
        for variant in args.partitioner:
            # 4000 tokens: more than 2x the width, as in training (with fewer, the partitioner may rather
            # keep a chunk's bf16 grad-logits than the lm_head grad); ~20 s per variant and loss on 2 cores
            print_saved_activations(args.saved_activations, 4000, variant)
        return

    import torch
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                command="python -m benchmarks.bench_memory " + shlex.join(sys.argv[1:]))
    results = []
    for depth in args.depths:
        for B in args.device_batch_sizes:
            for mode in args.modes:
                for loss, variant in [(l, v) for v in args.partitioner for l in args.loss]:
                    flags = config_flags(depth, mode, B, args.steps, args.seq_len, args.micro_batches, args.trainer_flags.split())
                    tag = f"d{depth}_{mode}_b{B}_{loss}" + ("" if variant == "default" else "_" + variant.replace("=", "-").replace(",", "_"))
                    spec = dict(flags=flags, loss=loss, partitioner=variant)
                    key = [str(depth), mode, str(B), loss, variant]
                    if args.snapshot and args.snapshot.split(":") == key[:len(args.snapshot.split(":"))]:
                        spec.update(snapshot_prefix=f"{args.out}_snapshot_{tag}", snapshot_pickle=args.snapshot_pickle)
                    row = dict(depth=depth, mode=mode, loss=loss, partitioner=variant, device_batch_size=B, micro_batches=args.micro_batches,
                               seq_len=args.seq_len, steps=args.steps, gpu=meta["gpu"], torch=meta["torch"], date=meta["date"],
                               command=("python -m scripts.base_train " + " ".join(flags)
                                        + ("" if loss == "chunked" else "  # with the old full-logits loss patched in")))
                    row.update(run_child(spec, args.timeout, f"{args.out}_{tag}.log"))
                    results.append(row)
                    peak = row.get("peak_memory_gib")
                    print(f"{tag}: " + (f"peak {peak:.2f} GiB" if peak is not None else "-")
                          + (" OOM" if row.get("oom") else "") + ("" if not row.get("error") or row.get("oom")
                                                                  else " FAILED: " + row["error"].strip().splitlines()[-1][:200]),
                          flush=True)
                    write_outputs(results, args.out, meta)  # after every configuration: a cut-off run keeps its rows
    print("\n".join(write_outputs(results, args.out, meta)))


if __name__ == "__main__":
    main()
