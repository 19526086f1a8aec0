"""
2:4 semi-structured sparse MLP layers for training on Hopper (H100), in plain PyTorch.

Why not torchao's SemiSparseLinear: on torch 2.11 + cuSPARSELt 0.8 it crashes in backward, its
packed buffers compute a wrong matrix when patched, it ranks weights by signed value, and it was
removed from torchao after 0.18 (docs/sparse-notes.md, ../shared/notes/h100-2to4-facts.md).
So we own the whole path and keep the seed's name for the module:

- SemiSparseLinear keeps the dense fp32 master weight as its Parameter. Once per optimizer step
  (refresh_sparse_weights, outside torch.compile) the bf16 copy of the weight is pruned with a
  transposable 2:4 mask (every 4x4 tile keeps at most 2 per row and 2 per column, greedily by
  |w|), so both W and W^T are 2:4 and the forward AND grad-input GEMMs can be sparse.
- Gradients are straight-through: y = x Wm^T, grad_x = gy Wm, grad_W = gy^T x (dense, not masked).
- Kernels: "masked" (dense matmul on the masked weight, any device: CPU tests, accuracy studies),
  "cusparselt" (torch._cslt_sparse_mm on W and W^T compressed once per step, algorithm ids timed
  per shape; where dense is measured faster for a shape and op, that op multiplies with the same
  masked weight densely: same function, only the kernel changes), "fp8" (nanochat/fp8.py).
"""

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError, print0

_log = print0  # set by convert_mlp_to_sparse; the kernel autotuner logs its choices through it

# -----------------------------------------------------------------------------
# The transposable 2:4 mask

def transposable_mask_reference(w):
    """Pure-PyTorch greedy transposable 2:4 mask (bool, same shape as w), same rule as the GPU
    tile kernel "largest_abs_values_greedy": in each 4x4 tile, visit the 16 entries by |w|
    descending and keep one if its row and its column both hold fewer than 2 kept entries.
    Greedy can get stuck below 8 kept per tile (~2% of entries); that is the GPU kernel's rule too.
    Ties are broken by position (stable sort: row-major within the tile, earlier first), so an
    all-zero tile (c_proj starts at zero) keeps rows 0-1 x cols 0-1 and rows 2-3 x cols 2-3.
    The GPU kernel's sorting network orders ties its own (deterministic) way; on an all-zero
    weight every mask gives Wm = 0, so the first mask of c_proj cannot change anything computed."""
    N, K = w.shape
    assert N % 4 == 0 and K % 4 == 0, f"2:4 mask needs both dims divisible by 4, got {N}x{K}"
    a = w.detach().to(torch.bfloat16).float().abs()  # rank the bf16 (compute-dtype) values
    tiles = a.reshape(N // 4, 4, K // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    order = torch.sort(tiles, dim=1, descending=True, stable=True).indices
    n = tiles.shape[0]
    ar = torch.arange(n, device=w.device)
    keep = torch.zeros(n, 16, dtype=torch.bool, device=w.device)
    rows = torch.zeros(n, 4, dtype=torch.int32, device=w.device)
    cols = torch.zeros(n, 4, dtype=torch.int32, device=w.device)
    for r in range(16):  # loop over ranks, vectorized across all tiles
        idx = order[:, r]
        ri, ci = idx // 4, idx % 4
        ok = (rows[ar, ri] < 2) & (cols[ar, ci] < 2)
        keep[ar, idx] = ok
        rows[ar, ri] += ok.int()
        cols[ar, ci] += ok.int()
    return keep.reshape(N // 4, K // 4, 4, 4).permute(0, 2, 1, 3).reshape(N, K)


def transposable_mask(w):
    """Transposable 2:4 mask of w's bf16 copy: the CUDA tile kernel where it applies, else the reference."""
    wb = w.detach().to(torch.bfloat16).contiguous()
    if wb.is_cuda and wb.shape[1] % 32 == 0 and wb.shape[0] % 32 == 0:
        # use_cutlass=True: we only take the bitmask (the kernel's own packed buffers are wrong for
        # cuSPARSELt 0.8). Applying the bitmask to ones gives the mask exactly, zeros in w included.
        bitmask = torch._sparse_semi_structured_tile(wb, algorithm="largest_abs_values_greedy", use_cutlass=True)[4]
        return torch._sparse_semi_structured_apply_dense(torch.ones_like(wb), bitmask) != 0
    return transposable_mask_reference(wb)

# -----------------------------------------------------------------------------
# cuSPARSELt GEMMs as custom ops (opaque to torch.compile, no graph breaks), with a per-shape plan

_PAD = 32                 # token counts are padded to a multiple of this for cuSPARSELt
_MIN_SPARSE_TOKENS = 1024  # below this (sampling, tiny batches) 2:4 never pays: use the dense masked weight
_PLANS = {}               # (device index, N, K, T bucket) -> {"fwd": alg id or None (dense), "dgrad": ...}
_SHAPE_LAYERS = {}        # (N, K) -> names of the layers with that weight shape (for the log)
_SPARSE_OPS = {}          # (N, K) -> ops ("fwd", "dgrad") allowed on cuSPARSELt, fixed by the first tuned T:
                          # packing skips compressing the others (compression is most of the per-step cost)
_HOST_FLOOR_MS = 1.6      # host ms per torch._cslt_sparse_mm call inside a compiled MLP (H100 box, torch 2.11)
FORCE = None              # tests/benchmarks: "sparse" = always cuSPARSELt (best alg), "dense" = always dense
MICRO_BATCHES = None      # set by the trainer (convert_mlp_to_sparse): micro-batches per optimizer step.
                          # None = an isolated layer (benchmarks): the host-time rule applies, see _autotune


def _bucket(T):
    """Plans are tuned per power-of-two token count (training T is fixed; eval may differ)."""
    return 1 << max(T - 1, 1).bit_length()


def _time_ms(fn, reps=3, batch=5):
    """(GPU ms, host ms) per call of fn, back to back. torch._cslt_sparse_mm spends ~1 ms of host
    time per call (descriptor and plan setup, torch 2.11): a GPU sleep queued first lets the host
    enqueue the whole batch, so the events time only the device work and the host clock the launches."""
    fn(); torch.cuda.synchronize()  # warm-up (also surfaces invalid algorithm ids as errors)
    gpu, host = [], []
    for _ in range(reps):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU spin while the host enqueues the batch
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        host.append((time.perf_counter() - t0) * 1e3 / batch)
        e.record(); e.synchronize()
        gpu.append(s.elapsed_time(e) / batch)
    return statistics.median(gpu), statistics.median(host)


def _autotune(N, K, T, device):
    """Time dense vs every valid cuSPARSELt algorithm id for fwd (x Wm^T) and dgrad (gy Wm) at this
    shape, on random data (never zeros). cuSPARSELt's own search sometimes picks a slower id."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16, generator=g)
    wm = torch.where(transposable_mask(w), w, 0)
    x = torch.randn(T, K, device=device, dtype=torch.bfloat16, generator=g)
    gy = torch.randn(T, N, device=device, dtype=torch.bfloat16, generator=g)
    plan, info = {}, []
    for op, c, inp, dense in (("fwd", torch._cslt_compress(wm), x, lambda: x @ wm.t()),
                              ("dgrad", torch._cslt_compress(wm.t().contiguous()), gy, lambda: gy @ wm)):
        t_dense = _time_ms(dense)[0]
        best, t_best, h_best, n_alg = None, float("inf"), 0.0, 0
        for alg in range(64):  # valid ids are 0..max-1; the max is not exposed for cuSPARSELt 0.8
            try:
                t, h = _time_ms(lambda: torch._cslt_sparse_mm(c, inp.t(), transpose_result=True, alg_id=alg))
            except RuntimeError:
                break
            n_alg += 1
            if t < t_best:
                best, t_best, h_best = alg, t, h
        t_pack = _time_ms(lambda: torch._cslt_compress(wm if op == "fwd" else wm.t().contiguous()), reps=3, batch=2)[0]
        allowed = _SPARSE_OPS.get((N, K))  # a later T may not bring back an op whose operand is no longer packed
        if MICRO_BATCHES is None:
            # Isolated layer (bench_mlp): sparse must win on the GPU, and its host launch cost must stay
            # hidden: a layer's GEMMs and elementwise ops (~4 dense-GEMM times) must cover its two
            # cuSPARSELt calls, i.e. host < 2 x dense GPU time. In a compiled MLP alone each call costs
            # >= _HOST_FLOOR_MS of host time (more than this same-call loop shows).
            ok = t_best < t_dense and max(h_best, _HOST_FLOOR_MS) < 2 * t_dense
        else:
            # Inside a model the host runs ahead of the GPU (attention, norms, the optimizer give it
            # slack; d20 with this host rule lost 4.4% end to end by going all dense), so decide on
            # GPU time: the saving over the micro-batches of one step must pay for compressing this
            # operand once per step.
            ok = (t_dense - t_best) * MICRO_BATCHES > t_pack
        ok = ok and (allowed is None or op in allowed)
        plan[op] = best if ok else None
        plan[op + "_best"], plan[op + "_ms"] = best, (t_best, h_best, t_dense, t_pack)
        info.append(f"{op} " + ("cusparselt" if ok else "dense") + f" (cusparselt alg {best}/{n_alg} {t_best:.3f} ms GPU,"
                    f" {h_best:.3f} ms host; dense {t_dense:.3f} ms; compress {t_pack:.3f} ms/step)")
    _SPARSE_OPS.setdefault((N, K), {op for op in ("fwd", "dgrad") if plan[op] is not None})
    names = _SHAPE_LAYERS.get((N, K), [])
    _log(f"2:4 kernels for {len(names)} layers of weight {N}x{K} ({_short_names(names)}) at T={T}: " + ", ".join(info))
    return plan


def _short_names(names):
    kinds = sorted({n.split(".")[-1] for n in names})
    return ",".join(kinds) if kinds else "-"


def _get_plan(N, K, T, device):
    if device.type != "cuda" or FORCE == "dense" or (T < _MIN_SPARSE_TOKENS and FORCE != "sparse"):
        return None
    key = (device.index, N, K, _bucket(T))
    if key not in _PLANS:
        _PLANS[key] = _autotune(N, K, _bucket(T), device)
    return _PLANS[key]


@torch.library.custom_op("nanochat_sparse::mm", mutates_args=())
def _sparse_mm(x: torch.Tensor, c: torch.Tensor, wm: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x @ Wm^T (transposed=False, c = compressed Wm) or x @ Wm (transposed=True, c = compressed Wm^T).
    wm is the same masked weight, dense, for the shapes/ops where dense was measured faster."""
    N, K = wm.shape
    T = x.shape[0]
    plan = _get_plan(N, K, T, x.device)
    op = "dgrad" if transposed else "fwd"
    alg = None if plan is None else plan[op + "_best" if FORCE == "sparse" else op]
    if alg is None:
        return x @ (wm if transposed else wm.t())
    Tp = -(-T // _PAD) * _PAD
    xp = x.contiguous() if Tp == T else F.pad(x, (0, 0, 0, Tp - T))
    y = torch._cslt_sparse_mm(c, xp.t(), transpose_result=True, alg_id=alg)
    return y if Tp == T else y[:T].clone()


@_sparse_mm.register_fake
def _(x, c, wm, transposed):
    return x.new_empty(x.shape[0], wm.shape[1] if transposed else wm.shape[0])


class _SparseLinearFn(torch.autograd.Function):
    """y = x Wm^T, grad_x = gy Wm, grad_W = gy^T x: the dense master weight gets the dense gradient
    of the pruned weight (straight-through). x (T, K) is already in the compute dtype of wm.
    c, ct: compressed Wm and Wm^T for the cuSPARSELt ops, or None for a plain dense matmul."""

    @staticmethod
    def forward(ctx, x, weight, wm, c, ct):
        ctx.save_for_backward(x, wm, ct)
        ctx.wdtype = weight.dtype
        return x @ wm.t() if c is None else _sparse_mm(x, c, wm, False)

    @staticmethod
    def backward(ctx, gy):
        x, wm, ct = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = gy @ wm if ct is None else _sparse_mm(gy.contiguous(), ct, wm, True)
        if ctx.needs_input_grad[1]:
            gw = (gy.t() @ x).to(ctx.wdtype)
        return gx, gw, None, None, None

# -----------------------------------------------------------------------------
# Kernel objects: pack(w_masked) once per step, outside compile; linear(x, weight) -> y with autograd.
# Packed tensors are non-persistent buffers updated in place (copy_), so compiled graphs see the
# same tensors every step (no recompiles) and checkpoints hold only the dense weights.

def _update(buf, new):
    if buf is None or buf.shape != new.shape or buf.dtype != new.dtype or buf.device != new.device:
        return new
    return buf.copy_(new)


class MaskedKernel(nn.Module):
    """Dense matmul on the masked weight: any device (fp32 on CPU, bf16 on CUDA)."""
    name = "masked"

    def __init__(self):
        super().__init__()
        self.register_buffer("wm", None, persistent=False)

    def pack(self, wm):
        self.wm = _update(self.wm, wm)

    def linear(self, x, weight):
        y = _SparseLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, self.wm, None, None)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class CusparseltKernel(MaskedKernel):
    """cuSPARSELt for fwd and dgrad (W and W^T compressed once per step), dense wgrad; per shape and
    op, dense on the masked weight where that was timed faster. Off CUDA it runs dense (tests)."""
    name = "cusparselt"

    def __init__(self):
        super().__init__()
        self.register_buffer("c", None, persistent=False)
        self.register_buffer("ct", None, persistent=False)

    def pack(self, wm):
        self.wm = _update(self.wm, wm)
        if wm.is_cuda:
            ops = _SPARSE_OPS.get(tuple(wm.shape))
            pack_all = ops is None or FORCE == "sparse" or self.c is None
            if pack_all or "fwd" in ops:
                self.c = _update(self.c, torch._cslt_compress(wm))
            if pack_all or "dgrad" in ops:
                self.ct = _update(self.ct, torch._cslt_compress(wm.t().contiguous()))
        elif self.c is None or self.c.device != wm.device:  # off CUDA the ops run their dense plan
            self.c, self.ct = wm.new_empty(0), wm.new_empty(0)

    def linear(self, x, weight):
        y = _SparseLinearFn.apply(x.reshape(-1, x.shape[-1]), weight, self.wm, self.c, self.ct)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def make_kernel(name, out_features, in_features, device):
    if name == "masked":
        return MaskedKernel()
    if name == "cusparselt":
        return CusparseltKernel()
    if name == "fp8":
        try:
            from nanochat.fp8 import Fp8SparseKernel, fp8_sparse_supported
            ok, reason = fp8_sparse_supported(device)
            if not ok:
                raise RuntimeError(reason)
            if not Fp8SparseKernel.supports(out_features, in_features):
                raise RuntimeError(f"{out_features}x{in_features} is not a multiple of 32")
            return Fp8SparseKernel(out_features, in_features, device)
        except Exception as e:  # no torchao, not Hopper, or a shape the kernel cannot take
            _log(f"Warning: fp8 2:4 kernel unavailable ({e}); this layer uses bf16 2:4 (cuSPARSELt)")
            return CusparseltKernel()
    raise UserError(f"unknown 2:4 kernel {name!r}: use masked, cusparselt or fp8")

# -----------------------------------------------------------------------------
# The layer

class SemiSparseLinear(nn.Linear):
    """nn.Linear whose forward uses the transposable-2:4-pruned weight; the Parameter stays dense."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None, backend="masked"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.kernel = make_kernel(backend, out_features, in_features, self.weight.device)
        self._packed_key = None  # (weight._version, data_ptr, device) at the last pack
        self.num_packs = 0

    @classmethod
    def from_linear(cls, linear, backend="masked", fp8=False):
        """Wrap an existing nn.Linear, keeping the very same Parameter objects (optimizer groups)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  backend="masked")
        del new.kernel  # the kernel belongs on the weight's device, not meta
        new.kernel = make_kernel("fp8" if fp8 else backend, linear.out_features, linear.in_features, linear.weight.device)
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    @torch.inference_mode(False)  # sampling runs under inference_mode: keep the packed buffers normal tensors
    @torch.no_grad()
    def refresh(self, force=False):
        """Re-prune and re-pack if the weight changed since the last pack (optimizer step, checkpoint
        load, .to()). Returns True if it packed. Must run outside torch.compile."""
        w = self.weight
        if w.device.type == "meta":
            return False
        key = (w._version, w.data_ptr(), w.device)
        if key == self._packed_key and not force:
            return False
        wb = w.detach().to(torch.bfloat16)
        mask = transposable_mask(wb)
        # CUDA computes in bf16 (like nn.Linear under autocast); elsewhere in the weight's dtype
        self.kernel.pack(torch.where(mask, wb, 0) if w.is_cuda else torch.where(mask, w.detach(), 0))
        self._packed_key = key
        self.num_packs += 1
        return True

    def forward(self, x):
        if not torch.compiler.is_compiling():
            self.refresh()  # eager use (eval, sampling) just works; a no-op when the weight is unchanged
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        y = self.kernel.linear(x.to(torch.bfloat16 if x.is_cuda else self.weight.dtype), self.weight)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(out_dtype)

    def extra_repr(self):
        return super().extra_repr() + f", kernel={getattr(self.kernel, 'name', type(self.kernel).__name__)}"

# -----------------------------------------------------------------------------
# Model-level entry points used by the trainer

def convert_mlp_to_sparse(model, device, backend="auto", fp8=False, log=print0, micro_batches=None):
    """Swap every nn.Linear under `.mlp.` with both dims divisible by 16 for a SemiSparseLinear
    (in place, same Parameters). Returns the number converted (0: training stays dense).
    micro_batches: micro-batches per optimizer step (the trainer passes it): the kernel choice then
    weighs each op's GPU-time saving per step against compressing its operand once per step."""
    global _log, MICRO_BATCHES
    _log = log
    MICRO_BATCHES = micro_batches
    if backend not in ("auto", "cusparselt", "masked"):
        raise UserError(f"unknown --sparse-backend {backend!r}: use auto, cusparselt or masked")
    device = torch.device(device)
    if backend == "masked":
        kernel = "masked"
    else:
        if device.type != "cuda":
            log("Warning: 2:4 sparsity requires CUDA, ignoring --sparse flag")
            return 0
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            log(f"Warning: 2:4 sparsity requires compute capability 8.0+, this GPU has {major}.{minor}; ignoring --sparse flag")
            return 0
        if not torch.backends.cusparselt.is_available():
            log("Warning: this torch has no cuSPARSELt; 2:4 sparsity uses the masked dense kernel (no speedup)")
            kernel = "masked"
        else:
            kernel = "cusparselt"  # "auto": cuSPARSELt with the timed per-shape dense fallback
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not isinstance(mod, SemiSparseLinear) and ".mlp." in name
               and mod.in_features % 16 == 0 and mod.out_features % 16 == 0]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        new = SemiSparseLinear.from_linear(mod, backend=kernel, fp8=fp8 and kernel != "masked")
        setattr(model.get_submodule(parent_name), child, new)
        _SHAPE_LAYERS.setdefault((new.out_features, new.in_features), []).append(name)
        new.refresh()  # pack now, before anything compiles the model
    log(f"✓ 2:4 sparsity enabled - converted {len(targets)} MLP layers to SemiSparseLinear")
    kinds = {}
    for name, mod in targets:
        new = model.get_submodule(name)
        k = getattr(new.kernel, "name", type(new.kernel).__name__)
        kinds.setdefault(k, []).append(f"{new.out_features}x{new.in_features}")
    summary = "; ".join(f"{k}: {len(v)} layers ({', '.join(sorted(set(v)))})" for k, v in kinds.items())
    extra = " (cuSPARSELt vs dense timed per shape and op at the first forward of each token count)" if kernel == "cusparselt" else ""
    log(f"2:4 kernels: {summary or 'none'}{extra}")
    return len(targets)


def refresh_sparse_weights(model):
    """Outside torch.compile, after each optimizer step and after loading a checkpoint: re-prune and
    re-pack every SemiSparseLinear whose weight changed (compiled forwards never do). Returns how many."""
    return sum(int(m.refresh()) for m in model.modules() if isinstance(m, SemiSparseLinear))


@torch.no_grad()
def mask_checksum(model):
    """An integer fingerprint of every layer's current 2:4 mask (recomputed from the weights).
    Under DDP all ranks must agree: the trainer compares it across ranks at each evaluation."""
    total = 0
    for m in model.modules():
        if isinstance(m, SemiSparseLinear):
            kept = transposable_mask(m.weight).view(-1).nonzero().view(-1)
            total += int((kept % 1_000_003).sum()) + 7 * kept.numel()
    return total
