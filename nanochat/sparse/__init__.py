"""
2:4 semi-structured sparse MLP layers for training on Hopper, one job per file:
  mask.py        the transposable 2:4 mask (W and W^T both 2:4) and its checksum
  cusparselt.py  cuSPARSELt GEMMs with plans built once (nvmath-python), torch._cslt_* fallback; the custom op
  compress.py    compressing W and W^T into cuSPARSELt's layout at GPU speed (learned bit order, self-checked)
  tune.py        timing GEMMs and compression, the on-disk timing cache, the per-op decision rule
  linear.py      SemiSparseLinear, its straight-through autograd function and kernels
  fp8.py         the fp8 2:4 kernel for --fp8 --sparse (torchao sm90 CUTLASS ops)
  convert.py     SparseConfig, converting a model's MLPs, re-pack hooks
"""

from nanochat.sparse.convert import (SparseConfig, convert_mlp_to_sparse, install_refresh_hooks, mask_checksum,
                                     refresh_sparse_weights, sparse_layers)
from nanochat.sparse.linear import DENSE, CusparseltKernel, MaskedKernel, SemiSparseLinear
from nanochat.sparse.mask import transposable_mask, transposable_mask_reference

__all__ = ["SparseConfig", "convert_mlp_to_sparse", "install_refresh_hooks", "mask_checksum", "refresh_sparse_weights",
           "sparse_layers", "DENSE", "CusparseltKernel", "MaskedKernel", "SemiSparseLinear", "transposable_mask",
           "transposable_mask_reference"]
