"""
The transposable 2:4 mask: in every 4x4 tile of W at most 2 entries are kept per row and per column,
so both W and W^T are 2:4 sparse and the forward and grad-input GEMMs can both run on sparse kernels.
"""

import torch


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


def tile_kernel_applies(w):
    """torch's CUDA tile kernel takes 2-D bf16/fp16 CUDA tensors with both dims divisible by 32."""
    return w.is_cuda and w.dim() == 2 and w.shape[0] % 32 == 0 and w.shape[1] % 32 == 0


def transposable_mask(w):
    """Transposable 2:4 mask of w's bf16 copy: the CUDA tile kernel where it applies, else the reference."""
    wb = w.detach().to(torch.bfloat16).contiguous()
    if tile_kernel_applies(wb):
        # use_cutlass=True: we only take the bitmask (the kernel's own packed buffers are wrong for
        # cuSPARSELt 0.8). Applying the bitmask to ones gives the mask exactly, zeros in w included.
        bitmask = torch._sparse_semi_structured_tile(wb, algorithm="largest_abs_values_greedy", use_cutlass=True)[4]
        return torch._sparse_semi_structured_apply_dense(torch.ones_like(wb), bitmask) != 0
    return transposable_mask_reference(wb)


def masked_bf16(w):
    """w's bf16 copy with its transposable 2:4 mask applied: on CUDA the tile kernel and one apply
    (three launches in all, the per-step re-pack's hot path), elsewhere the reference mask."""
    wb = w.detach().to(torch.bfloat16).contiguous()
    if tile_kernel_applies(wb):
        bitmask = torch._sparse_semi_structured_tile(wb, algorithm="largest_abs_values_greedy", use_cutlass=True)[4]
        return torch._sparse_semi_structured_apply_dense(wb, bitmask)
    return torch.where(transposable_mask_reference(wb), wb, 0)


@torch.no_grad()
def masks_checksum(masks):
    """An integer fingerprint of masks (an iterable of bool tensors). Under DDP all ranks must agree: the trainer
    compares it across ranks at each evaluation."""
    total = 0
    for mask in masks:
        kept = mask.reshape(-1).nonzero().view(-1)
        total += int((kept % 1_000_003).sum()) + 7 * kept.numel()
    return total
