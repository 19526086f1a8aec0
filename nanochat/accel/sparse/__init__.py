"""
2:4 semi-structured sparse MLP layers for training on Hopper, one job per file:
  mask.py        the transposable 2:4 mask (W and W^T both 2:4) and its checksum
  linear.py      SemiSparseLinear, its straight-through autograd function, the kernel interface (SparseOp)
                 and the bf16 kernels (MaskedKernel, CusparseltKernel)
  cusparselt.py  cuSPARSELt GEMMs with plans built once (nvmath-python), torch._cslt_* fallback; the custom op
  compress.py    compressing W and W^T into cuSPARSELt's layout at GPU speed (learned bit order, self-checked)
  fp8_ops.py     fp8 quantization and the fp8 GEMMs (torchao's CUTLASS 2:4, cuBLAS dense) of the fp8 kernel
  fp8_pack.py    packing fp8 2:4 weight operands into torchao's CUTLASS layout (learned, self-checked)
  fp8_kernel.py  Fp8SparseKernel, the fp8 2:4 kernel for --fp8 --sparse
  runtime.py     SparseRuntime: per device, the libraries, plans, compressors, packers and compiled helpers
  tune.py        timing GEMMs, packs and fp8 ops, their cache keys, the per-op decision rules (the timing cache
                 and the loop that chooses are nanochat/accel/kernel_choice.py)
  convert.py     SparseConfig, converting a model's MLPs and choosing their kernels (kernel_choice.choose), re-pack
The trainer reaches all of it through LinearConverter (nanochat/accel/converters.py).
"""

from nanochat.accel.sparse.convert import (SparseConfig, convert_mlp_to_sparse, install_refresh_hooks, mask_checksum,
                                     refresh_sparse_weights, sparse_layers)
from nanochat.accel.sparse.linear import DENSE, CusparseltKernel, MaskedKernel, SemiSparseLinear, SparseOp
from nanochat.accel.sparse.mask import transposable_mask, transposable_mask_reference
from nanochat.accel.sparse.runtime import SparseRuntime

__all__ = ["SparseConfig", "convert_mlp_to_sparse", "install_refresh_hooks", "mask_checksum", "refresh_sparse_weights",
           "sparse_layers", "DENSE", "CusparseltKernel", "MaskedKernel", "SemiSparseLinear", "SparseOp", "SparseRuntime",
           "transposable_mask", "transposable_mask_reference"]
