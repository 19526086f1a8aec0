"""What the sparse and fp8 paths both need from the machine, below both of them: support checks,
the token padding of GEMMs, and timing GPU work."""

import statistics

import torch

FP8_TOKEN_ALIGN = 16  # fp8 GEMMs (cuBLAS _scaled_mm, CUTLASS 2:4) want the token dim % 16


def round_up(n, multiple):
    """n rounded up to a multiple: a token count padded for a GEMM that wants aligned dims."""
    return -(-n // multiple) * multiple


def torchao_version():
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
    version = torchao_version()
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


def time_gpu_ms(fn, reps=5, batch=5):
    """Median GPU ms per call of fn, calls queued back to back behind a GPU sleep."""
    fn()
    torch.cuda.synchronize()  # warm-up, and surfaces invalid algorithm ids as errors here
    times = []
    for _ in range(reps):
        torch.cuda._sleep(10_000_000)  # a few ms of GPU spin while the host queues the batch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return statistics.median(times)
