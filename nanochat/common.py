"""Small shared utilities: base directory, logging on rank 0, device and distributed setup."""

import os
import sys

import torch
import torch.distributed as dist


class UserError(Exception):
    """Bad input from the user. Scripts print the message as one line and exit non-zero."""


def run_main(main):
    """Run a script's main(); a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def get_base_dir():
    """Everything a run writes (data, tokenizer, checkpoints, reports) lives under this directory."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:
        what = "is a file, not a directory" if os.path.isfile(base) else f"cannot be created ({e.strerror})"
        raise UserError(f"the base directory {base} {what}: set NANOCHAT_BASE_DIR to a directory "
                        f"(unset: ~/.cache/nanochat)")
    return base


def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def die_with_launcher():
    """Under torchrun: end this worker when its launcher dies. torchrun starts each worker in a session
    of its own, so a `kill -9` of torchrun alone would leave the workers training and writing
    checkpoints into the run's directory beside the resumed run. Linux only (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher was already gone before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def check_device_type(device_type):
    """--device-type names a device this machine has (one line otherwise, before anything is loaded)."""
    if device_type not in ("cuda", "cpu", "mps"):
        raise UserError(f"unknown --device-type {device_type!r}: use cuda, cpu or mps (or leave it empty to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda but no CUDA GPU is visible: use --device-type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type mps but MPS is not available: use --device-type cpu")


def compute_init(device_type="cpu"):
    """Pick the device, start the process group under torchrun. Returns (is_ddp, rank, local_rank, world_size, device)."""
    check_device_type(device_type)
    is_ddp, rank, local_rank, world_size = get_dist_info()
    if is_ddp:
        die_with_launcher()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if is_ddp and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return is_ddp, rank, local_rank, world_size, device


def rank0s(choice):
    """Rank 0's value of choice on every rank under torch.distributed (unchanged otherwise). Choices made
    from timings differ a little between ranks; every rank must run the same kernels and layers."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return choice


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def device_name(device):
    """The GPU's name (torch.cuda.get_device_name), or the device type elsewhere."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def gpu_peak_flops(device):
    """Dense bf16 peak FLOP/s of the GPU (for MFU), or None when unknown (CPU, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
                      ("A100", 312e12), ("B200", 2250e12), ("L40S", 362e12), ("4090", 165e12)):
        if key in name:
            return peak
    return None
