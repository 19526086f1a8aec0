"""
Turning a model's MLP layers into 2:4 sparse layers, choosing their kernels, and keeping their packed
weights in step with the dense master weights (optimizer step hooks, checkpoint loads).
"""

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
import torch.nn as nn

from nanochat.accel.hardware import fp8_sparse_supported, round_up
from nanochat.accel.kernel_choice import MARGINS, TimingCache, by_shape, choose, short_names, timing_key
from nanochat.accel.sparse.cusparselt import TOKEN_PAD, pick_impl
from nanochat.accel.sparse.linear import DENSE, CusparseltKernel, MaskedKernel, SemiSparseLinear, SparseOp
from nanochat.accel.sparse.mask import masks_checksum, transposable_mask
from nanochat.accel.sparse.runtime import SparseRuntime
from nanochat.accel.step_gate import sparse_step_pays
from nanochat.common import UserError, device_name, print0


@dataclass
class SparseConfig:
    """Settings of the 2:4 path. The kernels keep what they need of it; their state lives in a SparseRuntime."""
    backend: str = "auto"        # auto (cuSPARSELt where a whole-step record shows it pays: step_gate.py) | cusparselt | masked (dense GEMM on the masked weight)
    fp8: bool = False            # fp8 2:4 kernel (Hopper) for --fp8 --sparse
    tokens: Optional[int] = None  # tokens per micro-batch to choose kernels for (None: ops run dense until tuned)
    micro_batches: int = 1       # micro-batches per optimizer step: GEMM savings are weighed against one pack per step
    impl: str = "auto"           # cuSPARSELt calls: auto (nvmath-python if installed) | nvmath | torch
    compressor: str = "auto"     # auto (our GPU-speed compressor where it matches the library's bytes) | learned | cusparselt (the library's own: cuSPARSELt's compress, torchao's fp8 packer)
    force: Optional[str] = None  # None | "sparse" | "dense": every op on cuSPARSELt / dense (tests, benchmarks)
    # the run's kernel timings (kernel_choice.py); the trainer passes default_timing_cache(), the default keeps
    # them in memory (every start times again)
    timing_cache: TimingCache = field(default_factory=TimingCache)
    log: Callable = field(default=print0, repr=False)


def _kernel_kind(config, device):
    """'masked', 'cusparselt', 'fp8', or None when --sparse must be ignored here (with the warning logged)."""
    if config.backend not in ("auto", "cusparselt", "masked"):
        raise UserError(f"unknown --sparse-backend {config.backend!r}: use auto, cusparselt or masked")
    if config.force not in (None, "sparse", "dense"):
        raise ValueError(f"force must be None, 'sparse' or 'dense', got {config.force!r}")
    if config.backend == "masked":
        return "masked"
    if device.type != "cuda":
        config.log("Warning: 2:4 sparsity requires CUDA, ignoring --sparse flag")
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        config.log(f"Warning: 2:4 sparsity requires compute capability 8.0+, this GPU has {major}.{minor}; ignoring --sparse flag")
        return None
    if not torch.backends.cusparselt.is_available():
        config.log("Warning: this torch has no cuSPARSELt; 2:4 sparsity uses the masked dense kernel (no speedup)")
        return "masked"
    if config.fp8:
        ok, reason = fp8_sparse_supported(device)
        if ok:
            return "fp8"
        config.log(f"Warning: fp8 2:4 kernel unavailable ({reason}); the MLP layers use bf16 2:4 (cuSPARSELt)")
    return "cusparselt"


def _make_kernel(kind, impl, out_features, in_features, runtime, log):
    if kind == "fp8":
        from nanochat.accel.sparse.fp8_kernel import Fp8SparseKernel  # imports torchao
        if Fp8SparseKernel.supports(out_features, in_features):
            return Fp8SparseKernel(out_features, in_features, runtime.device, runtime)
        log(f"Warning: fp8 2:4 kernel needs dims divisible by 32, {out_features}x{in_features} uses bf16 2:4 (cuSPARSELt)")
        kind = "cusparselt"
    return CusparseltKernel(runtime.library(impl)) if kind == "cusparselt" else MaskedKernel()


def _tune(layers, config, impl, runtime):
    """Choose each (shape, op)'s kernel from GEMM timings (cached) and the measured cost of compressing its
    operand once per step; configure every cuSPARSELt kernel accordingly. Returns how many (layer, op)
    pairs run 2:4."""
    from nanochat.accel.sparse.tune import gemm_key, time_compress_ms, time_gemm
    lib, device, T = runtime.library(impl), runtime.device, config.tokens
    shapes = by_shape(layers)
    transposed = {"fwd": False, "dgrad": True}

    def dims(shape, op):  # the op's operand: W (N x K) for fwd, W^T (K x N) for dgrad
        N, K = shape
        return (N, K) if op == "fwd" else (K, N)

    def compressor(m, k):
        return runtime.compressor(impl, m, k, config.compressor, log=config.log)

    def cost(shape, op, gemm):
        m, k = dims(shape, op)
        pack_ms = time_compress_ms(compressor(m, k), lib.empty_compressed(m, k), m, k, transposed[op], device)
        return gemm["dense_ms"], gemm["sparse_ms"], pack_ms

    def describe(shape, chosen):
        def how(c):
            return f"cuSPARSELt alg {c.timings['alg']}" if c.fast else "dense"
        return _line(shape, shapes[shape], ", ".join(
            f"{op} {how(c)} (sparse {c.timings['sparse_ms']:.3f} ms, dense {c.timings['dense_ms']:.3f} ms; "
            f"compress {c.prep_ms:.3f} ms/step, {compressor(*dims(shape, op)).name})" for op, c in chosen.items()), T)

    if T is None or config.force == "dense":
        alg = 0 if config.force == "sparse" else DENSE
        algs = {shape: {"fwd": alg, "dgrad": alg} for shape in shapes}
    else:
        chosen = choose(shapes, ("fwd", "dgrad"), key=lambda shape, op: gemm_key(lib, *dims(shape, op), T, op),
                        time_fn=lambda shape, op: time_gemm(lib, *dims(shape, op), T, op, device), cost=cost,
                        cache=config.timing_cache, margin=MARGINS["2:4"], micro_batches=config.micro_batches,
                        force=None if config.force is None else config.force == "sparse",
                        log=config.log, describe=describe)
        algs = {shape: {op: c.timings["alg"] if c.fast else DENSE for op, c in ops.items()} for shape, ops in chosen.items()}
    Tp = round_up(T, TOKEN_PAD) if T else None
    on_24 = 0
    for shape, members in shapes.items():
        ops = {op: None if alg == DENSE else SparseOp(compressor(*dims(shape, op)), lib.empty_compressed(*dims(shape, op)), alg)
               for op, alg in algs[shape].items()}
        for _, layer in members:
            layer.kernel.configure(ops["fwd"], ops["dgrad"])
        on_24 += len(members) * sum(op is not None for op in ops.values())
        for op, sparse_op in ops.items():
            if Tp and sparse_op is not None:
                lib.prepare(*dims(shape, op), Tp, sparse_op.alg)  # build the plan now, not inside the first compiled step
        if T is None or config.force == "dense":
            config.log(_line(shape, members, members[0][1].kernel.describe() + " (not tuned: no token count)", T))
    return on_24


def _line(shape, members, detail, T=None):
    N, K = shape
    return (f"2:4 kernels for {len(members)} layers of weight {N}x{K} ({short_names(n for n, _ in members)})"
            f"{f' at T={T}' if T else ''}: {detail}")


def _tune_fp8(layers, config, runtime):
    """Per shape, each op of the fp8 kernels 2:4 or dense fp8 (on the masked weight), from measured GPU
    time (cached) weighed like the bf16 kernels', and the packers of W and W^T. Returns how many
    (layer, op) pairs run 2:4."""
    from nanochat.accel.hardware import torchao_version
    from nanochat.accel.sparse.fp8_ops import cast_tensorwise
    from nanochat.accel.sparse.tune import time_fp8_ops
    kind = "cutlass" if config.compressor == "cusparselt" else config.compressor  # the library's own packer
    shapes = by_shape(layers)
    packers = {(N, K): {op: runtime.fp8_packer(m, k, kind, log=config.log) for op, (m, k) in (("fwd", (N, K)), ("dgrad", (K, N)))}
               for N, K in shapes}

    def names(shape):
        return f"{packers[shape]['fwd'].name}/{packers[shape]['dgrad'].name}"

    if config.tokens is None or config.force is not None:
        fast = config.force != "dense"  # no token count: both 2:4
        choices = {shape: {"fwd": fast, "dgrad": fast} for shape in shapes}
        info = {shape: "not tuned" if config.force is None else f"forced {config.force}" for shape in shapes}
    else:
        def key(shape, _op):  # both ops' timings in one entry
            return timing_key("fp8 2:4", runtime.device, f"torchao {torchao_version()}", "{}x{}".format(*shape),
                              f"T{config.tokens}", f"packers {names(shape)}")
        chosen = choose(shapes, ("fwd", "dgrad"), key=key,
                        time_fn=lambda shape, _op: time_fp8_ops(*shape, config.tokens, runtime.device, packers[shape],
                                                                runtime.compiled(cast_tensorwise)),
                        cost=lambda _shape, op, t: (t[op]["dense_ms"], t[op]["sparse_ms"], t[op]["pack_ms"] - t[op]["cast_ms"]),
                        cache=config.timing_cache, margin=MARGINS["2:4"], micro_batches=config.micro_batches)
        choices = {shape: {op: c.fast for op, c in ops.items()} for shape, ops in chosen.items()}
        info = {shape: f"T={config.tokens}, " + ", ".join(
            f"{op} {'2:4' if choices[shape][op] else 'dense fp8'} (2:4 {t['sparse_ms']:.3f} ms, dense {t['dense_ms']:.3f} ms; "
            f"pack {t['pack_ms']:.3f} ms/step, cast {t['cast_ms']:.3f})"
            for op, t in sorted(chosen[shape]["fwd"].timings.items(), reverse=True)) for shape in shapes}
    on_24 = 0
    for (N, K), members in shapes.items():
        choice = choices[(N, K)]
        for _, layer in members:
            layer.kernel.configure(*(SparseOp(packers[(N, K)][op]) if choice[op] else None for op in ("fwd", "dgrad")))
        on_24 += len(members) * sum(bool(v) for v in choice.values())
        config.log(f"fp8 2:4 kernels for {len(members)} layers of weight {N}x{K} ({short_names(n for n, _ in members)}): "
                   f"{members[0][1].kernel.describe()}; packers {names((N, K))} ({info[(N, K)]})")
    return on_24


def sparse_target(name, mod):
    """The layers 2:4 applies to: every nn.Linear under `.mlp.` with both dims divisible by 16."""
    return (isinstance(mod, nn.Linear) and not isinstance(mod, SemiSparseLinear) and ".mlp." in name
            and mod.in_features % 16 == 0 and mod.out_features % 16 == 0)


def convert_mlp_to_sparse(model, device, config=None, runtime=None, names=None):
    """Swap every sparse_target layer (of `names`, the converter's plan, when given) for a SemiSparseLinear
    (in place, same Parameters), choose kernels and pack. runtime: the SparseRuntime the kernels use
    (None: a new one for this device). Returns the number converted (0: the model stays dense, e.g.
    --sparse on CPU). Call before torch.compile and DDP."""
    config = config or SparseConfig()
    device = torch.device(device)
    kind = _kernel_kind(config, device)
    if kind is None:
        return 0
    runtime = runtime or SparseRuntime(device)
    targets = [(name, mod) for name, mod in model.named_modules()
               if sparse_target(name, mod) and (names is None or name in names)]
    if kind in ("cusparselt", "fp8") and config.backend == "auto" and config.force is None and config.tokens and targets:
        width = min(min(mod.in_features, mod.out_features) for _, mod in targets)
        pays, line = sparse_step_pays(device_name(device), "fp8" if kind == "fp8" else "bf16", width, config.tokens,
                                      config.micro_batches)
        config.log(line)
        if not pays:  # bf16: the masked kernel, no library; fp8: every op dense fp8 on the masked weight
            kind, config = ("masked", config) if kind == "cusparselt" else (kind, replace(config, force="dense"))
    impl = None
    if kind in ("cusparselt", "fp8"):
        impl, reason = pick_impl(config.impl)
        config.log(f"2:4 GEMMs through cuSPARSELt via {'nvmath-python (plans built once)' if impl == 'nvmath' else 'torch._cslt_*'}: {reason}")
    layers = []
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        kernel = _make_kernel(kind, impl, mod.out_features, mod.in_features, runtime, config.log)
        new = SemiSparseLinear.from_linear(mod, kernel)
        setattr(model.get_submodule(parent_name), child, new)
        layers.append((name, new))
    config.log(f"✓ 2:4 sparsity enabled - converted {len(targets)} MLP layers to SemiSparseLinear")
    sparse_gemm_layers = [(n, m) for n, m in layers if isinstance(m.kernel, CusparseltKernel)]
    fp8_layers = [(n, m) for n, m in layers if m.kernel.name == "fp8"]
    on_24 = _tune(sparse_gemm_layers, config, impl, runtime) if sparse_gemm_layers else 0
    on_24 += _tune_fp8(fp8_layers, config, runtime) if fp8_layers else 0
    if (sparse_gemm_layers or fp8_layers) and config.tokens and config.force is None and on_24 == 0:
        config.log("2:4: no op pays at this size and token count (nanochat/accel/kernel_choice.py): every GEMM runs "
                   "dense on the 2:4-pruned weights, so --sparse trains the same sparse model at no speedup")
        for _, layer in sparse_gemm_layers:
            layer.kernel = MaskedKernel()  # dense on the masked weight without the library, its plans or compressors
    for _, layer in layers:
        layer.refresh()  # pack now, before anything compiles the model
    kinds = {}
    for _, layer in layers:
        kinds.setdefault(layer.kernel.name, set()).add(f"{layer.out_features}x{layer.in_features}")
    summary = "; ".join(f"{k}: {sum(1 for _, l in layers if l.kernel.name == k)} layers ({', '.join(sorted(v))})"
                        for k, v in kinds.items())
    config.log(f"2:4 kernels: {summary or 'none'}")
    return len(targets)


def sparse_layers(model):
    return [m for m in model.modules() if isinstance(m, SemiSparseLinear)]


def refresh_sparse_weights(model):
    """Re-prune and re-pack every SemiSparseLinear whose weight changed (a no-op otherwise). Outside
    torch.compile. Returns how many packed. The hooks of install_refresh_hooks call it for you."""
    return sum(int(m.refresh()) for m in sparse_layers(model))


def install_refresh_hooks(model, optimizers):
    """Re-pack the sparse layers right after each optimizer step that updates them (once per step,
    never per micro-batch) and after model.load_state_dict. Returns the hook handles."""
    layers = sparse_layers(model)

    def refresher(mine):
        def hook(*_):
            for m in mine:
                m.refresh()
        return hook
    handles = []
    for opt in optimizers:
        params = {id(p) for group in opt.param_groups for p in group["params"]}
        mine = [m for m in layers if id(m.weight) in params]
        if mine:
            handles.append(opt.register_step_post_hook(refresher(mine)))
    handles.append(model.register_load_state_dict_post_hook(refresher(layers)))
    return handles


@torch.no_grad()
def mask_checksum(model):
    """An integer fingerprint of every sparse layer's current 2:4 mask (recomputed from the weights).
    Under DDP all ranks must agree: the trainer compares it across ranks at each evaluation."""
    return masks_checksum(transposable_mask(m.weight) for m in sparse_layers(model))
