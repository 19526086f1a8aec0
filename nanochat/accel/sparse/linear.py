"""
SemiSparseLinear: an nn.Linear whose forward uses its transposable-2:4-pruned weight.

- The Parameter stays the dense fp32 master weight. Once per optimizer step, and after anything else writes
  it (a checkpoint load, DDP's broadcast, .to()), refresh() prunes its bf16 copy with the transposable mask
  and hands it to the kernel's pack(), outside torch.compile; forward never packs.
- Gradients are straight-through: y = x Wm^T, grad_x = gy Wm, grad_W = gy^T x (dense, not masked).
- Kernels: MaskedKernel (dense matmul on the masked weight, any device: CPU tests, accuracy studies),
  CusparseltKernel (cuSPARSELt for the forward and grad-input GEMMs on W and W^T compressed once per
  step, each op dense where that was measured faster), Fp8SparseKernel (nanochat/accel/sparse/fp8_kernel.py).
  Packed tensors are non-persistent buffers updated in place, so compiled graphs see the same tensors
  every step (no recompiles) and checkpoints hold only the dense weights.

Every kernel has the same interface:
  name                    "masked", "cusparselt" or "fp8"
  configure(fwd, dgrad)   each op (fwd: x Wm^T, dgrad: gy Wm) a SparseOp, or None: dense on the masked weight
  pack(wm)                once per step, outside torch.compile: wm is the masked weight (out, in)
  linear(x, weight)       y = x Wm^T with the straight-through gradient to the dense weight
  packed_buffers()        the tensors pack() writes (DDP broadcasts, memory accounting)
  describe()              one line: how each op runs
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from nanochat.accel.sparse.cusparselt import spmm
from nanochat.accel.sparse.mask import masked_bf16, transposable_mask

DENSE = -1  # algorithm id of an op that runs dense on the masked weight


@dataclass(frozen=True)
class SparseOp:
    """How one op runs 2:4. pack(operand, out) writes its weight operand (m x k, 2:4 along rows, any
    strides) into out: a cuSPARSELt compressor and its buffer (`out`, from library.empty_compressed), or
    an fp8 packer (out None: the kernel keeps what the first pack allocates). alg: the cuSPARSELt
    algorithm id (unused by fp8)."""
    pack: Callable
    out: Optional[torch.Tensor] = None
    alg: int = 0


class _SparseLinearFn(torch.autograd.Function):
    """y = x Wm^T, grad_x = gy Wm, grad_W = gy^T x: the dense master weight gets the dense gradient
    of the pruned weight (straight-through). x (T, K) is already in the compute dtype.
    wm: the masked weight (None when both ops run on cuSPARSELt); c, ct: compressed Wm and Wm^T;
    library: the handle of the cuSPARSELt library that compressed them (0 when both ops run dense)."""

    @staticmethod
    def forward(ctx, x, weight, wm, c, ct, fwd_alg, dgrad_alg, library):
        ctx.save_for_backward(x, wm, ct)
        ctx.wdtype, ctx.dgrad_alg, ctx.library = weight.dtype, dgrad_alg, library
        if fwd_alg == DENSE:
            return x @ wm.t()
        return spmm(x, c, weight.shape[0], fwd_alg, library)

    @staticmethod
    def backward(ctx, gy):
        x, wm, ct = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if ctx.dgrad_alg == DENSE:
                gx = gy @ wm
            else:
                gx = spmm(gy.contiguous(), ct, x.shape[1], ctx.dgrad_alg, ctx.library)
        if ctx.needs_input_grad[1]:
            gw = (gy.t() @ x).to(ctx.wdtype)
        return gx, gw, None, None, None, None, None, None


def _update(buf, new):
    """Write new into buf in place when it fits (compiled graphs keep pointing at buf)."""
    if buf is None or buf.shape != new.shape or buf.dtype != new.dtype or buf.device != new.device:
        return new
    return buf.copy_(new)


class MaskedKernel(nn.Module):
    """Dense matmul on the masked weight: any device (fp32 on CPU, bf16 on CUDA)."""
    name = "masked"

    def __init__(self):
        super().__init__()
        self.register_buffer("wm", None, persistent=False)

    def configure(self, fwd, dgrad):
        if fwd is not None or dgrad is not None:
            raise ValueError("the masked kernel runs every op dense: configure(None, None)")

    def pack(self, wm):
        self.wm = _update(self.wm, wm)

    def linear(self, x, weight):
        return _SparseLinearFn.apply(x, weight, self.wm, None, None, DENSE, DENSE, 0)

    def packed_buffers(self):
        return [self.wm]

    def describe(self):
        return "fwd dense, dgrad dense (masked weight)"


class CusparseltKernel(nn.Module):
    """cuSPARSELt for fwd (x Wm^T, Wm compressed) and dgrad (gy Wm, Wm^T compressed), dense wgrad.
    Each op runs dense on the masked weight until configure() gives it a SparseOp. library: the
    runtime's cuSPARSELt library object (SparseRuntime.library), None for a kernel that stays dense."""
    name = "cusparselt"

    def __init__(self, library=None):
        super().__init__()
        self.library = library
        # the custom op's argument; a plain int, so torch.compile never traces into the library object
        self.library_handle = library.handle if library is not None else 0
        self.fwd_alg = self.dgrad_alg = DENSE
        self.compress_w = self.compress_wt = None
        self.register_buffer("wm", None, persistent=False)
        self.register_buffer("c", None, persistent=False)
        self.register_buffer("ct", None, persistent=False)

    def configure(self, fwd, dgrad):
        """Each op a SparseOp (its algorithm id, the compressor of W or W^T and its buffer) or None (dense)."""
        if (fwd is not None or dgrad is not None) and self.library is None:
            raise ValueError("a cuSPARSELt op needs the kernel's library: CusparseltKernel(runtime.library(impl))")
        self.fwd_alg = fwd.alg if fwd else DENSE
        self.dgrad_alg = dgrad.alg if dgrad else DENSE
        self.compress_w, self.compress_wt = (fwd.pack if fwd else None), (dgrad.pack if dgrad else None)
        self.c = fwd.out if fwd else None
        self.ct = dgrad.out if dgrad else None

    def pack(self, wm):
        # the dense masked copy is kept only for ops that multiply with it
        self.wm = _update(self.wm, wm) if DENSE in (self.fwd_alg, self.dgrad_alg) else None
        if self.fwd_alg != DENSE:
            self.compress_w(wm, self.c)
        if self.dgrad_alg != DENSE:
            self.compress_wt(wm.t(), self.ct)

    def linear(self, x, weight):
        return _SparseLinearFn.apply(x, weight, self.wm, self.c, self.ct, self.fwd_alg, self.dgrad_alg,
                                     self.library_handle)

    def packed_buffers(self):
        return [b for b in (self.wm, self.c, self.ct) if b is not None]

    def describe(self):
        def op(alg):
            return "dense" if alg == DENSE else f"cuSPARSELt alg {alg}"
        return f"fwd {op(self.fwd_alg)}, dgrad {op(self.dgrad_alg)}"


class SemiSparseLinear(nn.Linear):
    """nn.Linear whose forward uses the transposable-2:4-pruned weight; the Parameter stays dense."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None, kernel=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.kernel = kernel if kernel is not None else MaskedKernel()
        self._packed_key = None  # (weight._version, data_ptr, device) at the last pack
        self.num_packs = 0

    @classmethod
    def from_linear(cls, linear, kernel=None):
        """Wrap an existing nn.Linear, keeping the very same Parameter objects (optimizer groups)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.kernel = kernel if kernel is not None else MaskedKernel()
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    @torch.inference_mode(False)  # sampling runs under inference_mode: keep the packed buffers normal tensors
    @torch.no_grad()
    def refresh(self, force=False):
        """Re-prune and re-pack if the weight changed since the last pack (optimizer step, checkpoint
        load, .to()). Returns True if it packed. Runs outside torch.compile."""
        w = self.weight
        if w.device.type == "meta" or not (force or self.stale()):
            return False
        # CUDA computes in bf16 (like nn.Linear under autocast); elsewhere in the weight's dtype
        wm = masked_bf16(w) if w.is_cuda else torch.where(transposable_mask(w), w.detach(), 0)
        self.kernel.pack(wm)
        self._packed_key = self.weight_key()
        self.num_packs += 1
        return True

    def weight_key(self):
        w = self.weight
        return (w._version, w.data_ptr(), w.device)

    def stale(self):
        """The weight changed since the last pack (optimizer step, checkpoint load, .to())."""
        return self.weight_key() != self._packed_key

    def forward(self, x):
        # forward never packs: the packed weight is refreshed after each optimizer step and after anything else
        # writes the weight (LinearConverter.post_optimizer_hook and sync); eager use checks it is not stale
        if not torch.compiler.is_compiling() and self.stale():
            raise RuntimeError(f"SemiSparseLinear {self.out_features}x{self.in_features}: the weight changed since its "
                               f"last pack; call refresh() (LinearConverter.sync, refresh_sparse_weights) after writing "
                               f"weights outside an optimizer step")
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2 = x.to(torch.bfloat16 if x.is_cuda else self.weight.dtype).reshape(-1, x.shape[-1])
        y = self.kernel.linear(x2, self.weight)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(out_dtype)

    def extra_repr(self):
        return super().extra_repr() + f", kernel={getattr(self.kernel, 'name', type(self.kernel).__name__)}"
