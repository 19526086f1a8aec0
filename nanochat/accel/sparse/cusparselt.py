"""
cuSPARSELt 2:4 GEMMs: y = x @ A^T with A (m x k) 2:4 sparse along its rows, compressed once per step.

Two implementations of the same calls, same compressed bytes:
- "nvmath": NVIDIA's nvmath-python bindings (`pip install nvmath-python`, the `gpu` extra). The matrix
  descriptors, algorithm selection and plan are built once per (m, k, tokens, algorithm) and kept;
  a matmul then costs ~20 us of host time. Compression reuses a kept descriptor.
- "torch": torch._cslt_sparse_mm / torch._cslt_compress, which rebuild every descriptor and the plan
  on each call (0.4-0.8 ms of host time per call in torch 2.11). Used where nvmath is not installed.

Layout (both): A is a structured m x k row-major matrix; x (T x k, row-major) is the dense k x T
column-major B; the output (T x m, row-major) is the dense m x T column-major D. This is what
torch._cslt_sparse_mm(c, x.t(), transpose_result=True) computes, bit for bit.

The library objects are owned by a SparseRuntime (nanochat/accel/sparse/runtime.py), one per device. The GEMM
is a torch.library custom op (`nanochat_sparse::spmm`) with a fake implementation, so torch.compile keeps
one graph around it and CUDA graphs can capture it; custom ops take only tensors and numbers, so the op
is handed its library's integer handle. The op only runs plans: algorithm choice and timing happen
before training (nanochat/accel/sparse/tune.py).
"""

import itertools
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from nanochat.accel.hardware import round_up

TOKEN_PAD = 32  # cuSPARSELt wants the dense dims aligned; odd token counts are zero-padded to this
_BF16 = 14      # cudaDataType CUDA_R_16BF
_ORDER_COL, _ORDER_ROW = 1, 2
_NON_TRANSPOSE = 0
_ALIGN = 16     # bytes


def nvmath_status():
    """(available, reason): can the nvmath-python cuSPARSELt bindings be used here?"""
    try:
        from nvmath.bindings import cusparseLt  # noqa: F401  (loads libcusparseLt)
    except Exception as e:  # not installed, or its CUDA libraries do not load
        return False, f"nvmath-python unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return True, "nvmath-python cuSPARSELt bindings"


def pick_impl(requested="auto"):
    """(impl, reason): "nvmath" where its bindings load, else "torch" (torch._cslt_*)."""
    if requested not in ("auto", "nvmath", "torch"):
        raise ValueError(f"unknown cuSPARSELt implementation {requested!r}: use auto, nvmath or torch")
    if requested == "torch":
        return "torch", "requested"
    ok, reason = nvmath_status()
    if ok:
        return "nvmath", reason
    if requested == "nvmath":
        raise RuntimeError(reason + ": pip install nvmath-python")
    return "torch", reason + "; plans are rebuilt on every call (slower)"


class Library:
    """What both implementations share: an integer handle through which the custom op, which takes only
    tensors and numbers, finds the object. The handle table is weak: it keeps nothing alive, and a library
    lives as long as the runtime or kernels that hold it."""
    _by_handle = weakref.WeakValueDictionary()
    _next_handle = itertools.count(1)

    def __init__(self, device):
        self.device = torch.device(device)
        self.handle = next(Library._next_handle)
        Library._by_handle[self.handle] = self

    @staticmethod
    def from_handle(handle):
        return Library._by_handle[handle]


class NvmathCusparselt(Library):
    """One cuSPARSELt handle on one device, with the descriptors and plans it has built."""
    name = "nvmath"

    def __init__(self, device):
        super().__init__(device)
        from nvmath.bindings import cusparseLt
        self.lt = cusparseLt
        self.lt_handle = cusparseLt.init()
        self.version = cusparseLt.get_version(self.lt_handle)
        # host scalars and the stream array live at fixed addresses while this object lives
        self._alpha_beta = np.array([1.0, 0.0], dtype=np.float32)
        self._alpha = self._alpha_beta.ctypes.data
        self._beta = self._alpha + 4
        self._stream = np.zeros(1, dtype=np.int64)
        self._stream_ptr = self._stream.ctypes.data
        self._sparse = {}  # (m, k) -> (structured descriptor, compressed bytes, compress scratch tensor)
        self._plans = {}   # (m, k, T, alg) -> (plan, workspace tensor); T already padded

    def _sparse_desc(self, m, k):
        if (m, k) not in self._sparse:
            lt = self.lt
            desc = lt.structured_descriptor_init(self.lt_handle, m, k, k, _ALIGN, _BF16, _ORDER_ROW,
                                                 lt.Sparsity.SPARSITY_50_PERCENT)
            size, scratch = lt.sp_mma_compressed_size2(self.lt_handle, desc)
            self._sparse[(m, k)] = (desc, size, torch.empty(max(scratch, 1), dtype=torch.uint8, device=self.device))
        return self._sparse[(m, k)]

    def empty_compressed(self, m, k):
        return torch.empty(self._sparse_desc(m, k)[1], dtype=torch.uint8, device=self.device)

    def compress(self, a, out):
        """Compress a (m x k, row-major bf16, 2:4 along rows) into out (from empty_compressed)."""
        m, k = a.shape
        desc, _, scratch = self._sparse_desc(m, k)
        self.lt.sp_mma_compress2(self.lt_handle, desc, 1, _NON_TRANSPOSE, a.data_ptr(), out.data_ptr(),
                                 scratch.data_ptr(), torch.cuda.current_stream(self.device).cuda_stream)
        return out

    def num_algs(self, m, k, T):
        return self._plan(m, k, T, 0)[3]

    def prepare(self, m, k, T, alg):
        """Build the plan for this GEMM now (outside any compiled graph or CUDA-graph capture)."""
        self._plan(m, k, T, alg)

    def _plan(self, m, k, T, alg):
        key = (m, k, T, alg)
        if key not in self._plans:
            lt, h = self.lt, self.lt_handle
            sparse = self._sparse_desc(m, k)[0]
            dense_b = lt.dense_descriptor_init(h, k, T, k, _ALIGN, _BF16, _ORDER_COL)
            dense_d = lt.dense_descriptor_init(h, m, T, m, _ALIGN, _BF16, _ORDER_COL)
            matmul = lt.matmul_descriptor_init(h, _NON_TRANSPOSE, _NON_TRANSPOSE, sparse, dense_b, dense_d, dense_d,
                                               lt.ComputeType.COMPUTE_32F)
            selection = lt.matmul_alg_selection_init(h, matmul, lt.MatmulAlg.DEFAULT)
            value = np.zeros(1, dtype=np.int32)
            lt.matmul_alg_get_attribute(h, selection, lt.MatmulAlgAttribute.CONFIG_MAX_ID, value.ctypes.data, 4)
            num_algs = int(value[0])
            if not 0 <= alg < num_algs:
                raise ValueError(f"cuSPARSELt algorithm {alg} out of range 0..{num_algs - 1} for {m}x{k}, T={T}")
            value[0] = alg
            lt.matmul_alg_set_attribute(h, selection, lt.MatmulAlgAttribute.CONFIG_ID, value.ctypes.data, 4)
            plan = lt.matmul_plan_init(h, matmul, selection)
            ws = lt.matmul_get_workspace(h, plan)
            workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=self.device)
            # the descriptors must outlive the plan: keep them with it
            self._plans[key] = (plan, workspace, (dense_b, dense_d, matmul, selection), num_algs)
        return self._plans[key]

    def num_plans(self):
        return len(self._plans)

    def matmul(self, c, x, m, alg):
        """x (T x k, T padded) @ A^T -> (T x m) bf16, A given compressed as c."""
        T, k = x.shape
        plan, workspace = self._plan(m, k, T, alg)[:2]
        y = torch.empty(T, m, dtype=torch.bfloat16, device=x.device)
        self._stream[0] = torch._C._cuda_getCurrentRawStream(self.device.index)  # the cheapest way to ask
        self.lt.matmul(self.lt_handle, plan, self._alpha, c.data_ptr(), x.data_ptr(), self._beta, y.data_ptr(),
                       y.data_ptr(), workspace.data_ptr(), self._stream_ptr, 1)
        return y


class TorchCusparselt(Library):
    """The same operations through torch._cslt_* (descriptors and plan rebuilt on every call)."""
    name = "torch"

    def __init__(self, device):
        super().__init__(device)
        self.version = torch.backends.cusparselt.version()
        self._sizes = {}

    def empty_compressed(self, m, k):
        if (m, k) not in self._sizes:
            probe = torch._cslt_compress(torch.zeros(m, k, dtype=torch.bfloat16, device=self.device))
            self._sizes[(m, k)] = probe.numel() * probe.element_size()
        return torch.empty(self._sizes[(m, k)], dtype=torch.uint8, device=self.device)

    def compress(self, a, out):
        c = torch._cslt_compress(a)
        return out.copy_(c.view(-1).view(torch.uint8))

    def num_algs(self, m, k, T):
        return None  # not exposed: the tuner probes ids until one fails

    def prepare(self, m, k, T, alg):
        pass  # torch builds the plan inside every call

    def num_plans(self):
        return 0

    def matmul(self, c, x, m, alg):
        cb = c.view(torch.bfloat16).view(m, -1)  # torch wants the 2-D compressed tensor it returned
        return torch._cslt_sparse_mm(cb, x.t(), transpose_result=True, alg_id=alg)


IMPLEMENTATIONS = {"nvmath": NvmathCusparselt, "torch": TorchCusparselt}


@torch.library.custom_op("nanochat_sparse::spmm", mutates_args=())
def spmm(x: torch.Tensor, c: torch.Tensor, m: int, alg: int, library: int) -> torch.Tensor:
    """x (T x k, bf16) @ A^T -> (T x m, bf16), A (m x k, 2:4) compressed as c by the library whose
    handle is given."""
    T = x.shape[0]
    Tp = round_up(T, TOKEN_PAD)
    xp = x.contiguous() if Tp == T else F.pad(x, (0, 0, 0, Tp - T))
    y = Library.from_handle(library).matmul(c, xp, m, alg)
    return y if Tp == T else y[:T].clone()


@spmm.register_fake
def _(x, c, m, alg, library):
    return x.new_empty(x.shape[0], m)
