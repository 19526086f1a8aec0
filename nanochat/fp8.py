"""FP8 training: dense Linear layers through torchao.float8 (the 2:4 sparse MLP layers of --fp8 --sparse
have their own fp8 kernel, nanochat/sparse/fp8.py).

Nothing here imports torchao at module import time: CPU machines (and CI) never need it.

Dense recipe: tensorwise scaling (one scale per tensor, cuBLAS fp8 GEMMs). torchao documents it
as its fastest recipe and upstream nanochat measured it faster end to end than rowwise
(d26 on 8xH100: 740K tok/s tensorwise vs 564K rowwise, 630K bf16). benchmarks/bench_mlp_fp8.py
times both on our MLP shapes.
"""

import types
from contextlib import contextmanager

import torch
import torch.nn as nn

from nanochat.common import print0
from nanochat.sparse.linear import SemiSparseLinear


# -----------------------------------------------------------------------------
# Support checks

def _torchao_version():
    """torchao's version string, or None when it cannot be imported."""
    try:
        import torchao
    except Exception:
        return None
    return getattr(torchao, "__version__", "unknown")


def fp8_supported(device):
    """(ok, reason): fp8 training needs CUDA, compute capability >= 8.9 and torchao 0.17/0.18."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"device is {device.type}, not cuda"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"GPU {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}"
    version = _torchao_version()
    if version is None:
        return False, "torchao is not installed (pip install 'torchao>=0.17,<0.19')"
    if not version.startswith(("0.17", "0.18")):
        return False, f"torchao {version} is untested here (need 0.17 or 0.18)"
    return True, f"compute capability {major}.{minor}, torchao {version}"


def fp8_sparse_supported(device):
    """(ok, reason): the fp8 2:4 kernels are built for sm90 (Hopper) only."""
    ok, reason = fp8_supported(device)
    if not ok:
        return ok, reason
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    if major != 9:
        return False, f"torchao's fp8 2:4 CUTLASS kernels need sm90 (Hopper), GPU is sm{major}{minor}"
    return True, reason


# -----------------------------------------------------------------------------
# Dense fp8: torchao.float8

def fp8_module_filter(mod, fqn, skipped=None):
    """Which Linear layers convert_to_float8 swaps. Dims that are not multiples of 16 are
    left in bf16 (fp8 GEMMs cannot take them) and their names appended to `skipped`."""
    if not isinstance(mod, nn.Linear):
        return False
    if fqn == "lm_head" or fqn.endswith(".lm_head"):
        return False  # logits stay in bf16/fp32: small share of FLOPs, sensitive to precision
    if isinstance(mod, SemiSparseLinear):
        return False  # 2:4 layers have their own fp8 kernel (nanochat/sparse/fp8.py)
    if type(mod).__name__ == "Float8Linear":
        return False  # already converted
    if mod.in_features % 16 != 0 or mod.out_features % 16 != 0:
        if skipped is not None:
            skipped.append(f"{fqn} ({mod.out_features}x{mod.in_features})")
        return False
    return True


def convert_to_float8(model, device, log=print0, recipe="tensorwise"):
    """Swap the transformer's nn.Linear layers for torchao Float8Linear, in place.
    Call before torch.compile and DDP. Returns the names of the converted layers ([] when fp8
    is not supported here: then it logs one warning line and leaves the model in bf16)."""
    ok, reason = fp8_supported(device)
    if not ok:
        log(f"Warning: --fp8 requires a CUDA GPU with compute capability >= 8.9 and torchao 0.17/0.18 ({reason}), training in bf16")
        return []
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    converted, skipped = [], []

    def module_filter_fn(mod, fqn):
        keep = fp8_module_filter(mod, fqn, skipped)
        if keep:
            converted.append(fqn)
        return keep

    convert_to_float8_training(model, module_filter_fn=module_filter_fn, config=config)
    log(f"fp8: converted {len(converted)} Linear layers to float8 ({recipe} scaling)")
    if skipped:
        log(f"fp8: kept in bf16 (dims not multiples of 16): {', '.join(skipped)}")
    return converted


@contextmanager
def bf16_linears(model):
    """Inside this block torchao Float8Linear layers run as plain nn.Linear (bf16 under autocast).
    For eager sampling: a Float8 tensor rejects autocast's casts (aten.to.dtype) and fp8 GEMMs need
    token counts that are multiples of 16, while generation feeds one token at a time."""
    swapped = [m for m in model.modules() if type(m).__name__ == "Float8Linear"]
    for m in swapped:
        m.forward = types.MethodType(nn.Linear.forward, m)  # instance attribute shadows the class method
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward
