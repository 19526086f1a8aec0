"""
Export a trained sparse checkpoint for inference with the 2:4 MLP weights stored compressed.

Format (one safetensors file): for each sparse MLP weight W (N x K), `<name>.values` (N x K/2: the two
entries kept in every group of 4 along a row, in W's dtype) and `<name>.meta` (N x K/8 uint8: the two
2-bit column indices of each group, two groups per byte), the 2:4 layout cuSPARSELt and CUTLASS use.
Group g of a row (columns 4g..4g+3) stores its values at values[n, 2g] and values[n, 2g+1]; its indices
sit in byte meta[n, g // 2], the low nibble for even g, the high one for odd g; within a nibble bits 0-1
are the first value's column and bits 2-3 the second's, ascending.
Every other parameter is stored dense. The header's metadata holds the model config and the list of
compressed layers. The transposable mask keeps at most 2 per group (a few groups keep fewer):
those are padded with explicit zeros so every group stores exactly 2.
"""

import json

import torch

from nanochat.accel.sparse import SemiSparseLinear, transposable_mask
from nanochat.gpt import GPT, GPTConfig


def compress_2to4(w, mask):
    """(values [N, K/2], meta [N, K/8] uint8) of w under a mask with at most 2 kept per group of 4 along rows."""
    N, K = w.shape
    assert K % 8 == 0, f"compressed 2:4 needs in_features divisible by 8, got {K}"
    m = mask.view(N, K // 4, 4)
    assert int(m.sum(-1).max()) <= 2, "mask keeps more than 2 of 4 in some group"
    # kept positions first, then the lowest free positions as zero padding; indices ascending
    score = m.to(torch.int32) * 8 + (3 - torch.arange(4, device=w.device, dtype=torch.int32))
    idx = torch.topk(score, 2, dim=-1).indices.sort(dim=-1).values  # (N, K/4, 2)
    values = torch.gather(w.view(N, K // 4, 4), -1, idx) * torch.gather(m, -1, idx)
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # (N, K/4): 4 bits per group
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values.reshape(N, K // 2).contiguous(), meta.contiguous()


def decompress_2to4(values, meta):
    """The dense (N, K) weight back from compress_2to4's output."""
    N, K = values.shape[0], values.shape[1] * 2
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).view(N, K // 4).to(torch.int64)
    idx = torch.stack([nibble & 3, nibble >> 2], dim=-1)  # (N, K/4, 2)
    w = torch.zeros(N, K // 4, 4, dtype=values.dtype, device=values.device)
    w.scatter_(-1, idx, values.view(N, K // 4, 2))
    return w.view(N, K)


@torch.no_grad()
def export_sparse_model(model, path, dtype=torch.float32):
    """Write model (GPT with SemiSparseLinear MLPs) to `path`. Returns (dense_bytes, compressed_bytes)
    of the sparse weights in `dtype`."""
    from safetensors.torch import save_file
    tensors, sparse_names = {}, []
    dense_bytes = compressed_bytes = 0
    sparse_modules = {name: m for name, m in model.named_modules() if isinstance(m, SemiSparseLinear)}
    for name, param in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        if module_name in sparse_modules and name.endswith(".weight"):
            w = param.to(dtype)
            values, meta = compress_2to4(w, transposable_mask(param))
            tensors[f"{module_name}.values"], tensors[f"{module_name}.meta"] = values, meta
            sparse_names.append(module_name)
            dense_bytes += w.numel() * w.element_size()
            compressed_bytes += values.numel() * values.element_size() + meta.numel()
        else:
            tensors[name] = param.to(dtype).contiguous()
    metadata = {"model_config": json.dumps(model.config.to_dict()), "sparse_layers": json.dumps(sparse_names),
                "format": "nanochat-2to4-v1"}
    save_file({k: v.cpu() for k, v in tensors.items()}, path, metadata=metadata)
    return dense_bytes, compressed_bytes


def load_sparse_export(path, device="cpu"):
    """A GPT from an exported file. On CUDA the MLP layers become SemiSparseLinear (2:4 kernels); on CPU
    they are plain nn.Linear holding the decompressed, already-masked weights (the same function)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    if metadata.get("format") != "nanochat-2to4-v1":
        raise ValueError(f"{path} is not a nanochat sparse export")
    tensors = load_file(path)
    state = {}
    for name in json.loads(metadata["sparse_layers"]):
        state[f"{name}.weight"] = decompress_2to4(tensors.pop(f"{name}.values"), tensors.pop(f"{name}.meta"))
    state.update(tensors)
    device = torch.device(device)
    model = GPT(GPTConfig(**json.loads(metadata["model_config"])))
    model.to(device)
    model.init_weights()  # rotary buffers; weights are overwritten next
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    if device.type == "cuda":
        from nanochat.accel.converters import LinearConverter
        LinearConverter.from_meta(dict(sparse=True, sparse_backend="auto"), device).convert(model)
    model.eval()
    return model
