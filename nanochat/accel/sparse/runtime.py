"""
SparseRuntime: the state of the 2:4 kernels on one device, made by whoever converts a model (the trainer's
LinearConverter, a test, a benchmark) and kept by the kernels it builds. It owns
  - the cuSPARSELt library objects, one per implementation (each with its handle, descriptors and plans),
  - the 2:4 compressors, one per library, shape and kind (learning a layout costs probes and a self-check),
  - the fp8 packers, one per shape and kind,
  - the torch.compile wrappers of the packers' and casts' functions, one per function: every wrapper of
    the same code counts against dynamo's recompile limit, so packers of all shapes share one.
Two runtimes share nothing; what one builds lives as long as it does.
"""

import torch

from nanochat.accel.sparse.compress import make_compressor
from nanochat.accel.sparse.cusparselt import IMPLEMENTATIONS
from nanochat.accel.sparse.fp8_pack import make_fp8_packer


class SparseRuntime:

    def __init__(self, device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._libraries = {}    # impl -> library object
        self._compressors = {}  # (impl, m, k, kind) -> compressor
        self._fp8_packers = {}  # (m, k, kind) -> packer
        self._compiled = {}     # function -> its torch.compile wrapper

    def library(self, impl):
        """The cuSPARSELt library object of an implementation ("nvmath" or "torch") on this device."""
        if impl not in self._libraries:
            with torch.cuda.device(self.device):
                self._libraries[impl] = IMPLEMENTATIONS[impl](self.device)
        return self._libraries[impl]

    def compressor(self, impl, m, k, kind="auto", log=None):
        """The compressor of (m x k) 2:4 operands into this library's layout (make_compressor)."""
        key = (impl, m, k, kind)
        if key not in self._compressors:
            self._compressors[key] = make_compressor(self.library(impl), m, k, self.device, kind, log, self.compiled)
        return self._compressors[key]

    def fp8_packer(self, m, k, kind="auto", log=None):
        """The fp8 2:4 packer of (m x k) operands (make_fp8_packer), its functions compiled here."""
        key = (m, k, kind)
        if key not in self._fp8_packers:
            self._fp8_packers[key] = make_fp8_packer(m, k, self.device, kind, log, compiler=self.compiled)
        return self._fp8_packers[key]

    def compiled(self, fn):
        """fn compiled with dynamic shapes, one wrapper per function."""
        if fn not in self._compiled:
            self._compiled[fn] = torch.compile(fn, dynamic=True)
        return self._compiled[fn]
