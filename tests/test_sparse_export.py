import os

import pytest
import torch

from nanochat.accel.sparse import transposable_mask_reference
from nanochat.accel.sparse_export import compress_2to4, decompress_2to4, export_sparse_model, load_sparse_export


@pytest.mark.parametrize("shape", [(8, 16), (64, 256), (256, 64)])
def test_compress_round_trip(shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape)
    mask = transposable_mask_reference(w)
    values, meta = compress_2to4(w, mask)
    assert values.shape == (shape[0], shape[1] // 2) and meta.shape == (shape[0], shape[1] // 8)
    assert meta.dtype == torch.uint8
    torch.testing.assert_close(decompress_2to4(values, meta), torch.where(mask, w, 0), rtol=0, atol=0)


def decode_2to4(values, meta):
    """The format as nanochat/accel/sparse_export.py documents it, decoded one group at a time: row n's group g
    (columns 4g..4g+3) stores its two kept entries in values[n, 2g], values[n, 2g + 1]; byte meta[n, g // 2] holds
    group g in its low nibble when g is even, its high nibble when odd; a nibble is two 2-bit column indices within
    the group, the first value's in bits 0-1, the second's in bits 2-3."""
    N, half = values.shape
    dense = [[0.0] * (2 * half) for _ in range(N)]
    for n in range(N):
        for g in range(half // 2):
            nibble = (int(meta[n, g // 2]) >> (4 * (g % 2))) & 0xF
            first, second = nibble & 3, nibble >> 2
            assert first < second, (n, g, nibble)  # two distinct positions, ascending
            dense[n][4 * g + first] = values[n, 2 * g].item()
            dense[n][4 * g + second] = values[n, 2 * g + 1].item()
    return torch.tensor(dense, dtype=values.dtype)


def test_compressed_bytes_follow_the_documented_format():
    # groups keep columns (1, 3) and (0, 3): nibbles 1 | 3 << 2 = 0xD and 0 | 3 << 2 = 0xC, one byte 0xCD
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 4.0]])
    values, meta = compress_2to4(w, w != 0)
    assert values.tolist() == [[1.5, -2.0, 3.0, 4.0]] and meta.tolist() == [[0xCD]]
    # a group keeping one entry (or none) stores two positions all the same, the free one holding zero
    w1 = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values, meta = compress_2to4(w1, w1 != 0)
    assert torch.equal(decode_2to4(values, meta), w1)
    for shape in [(8, 16), (64, 256)]:
        torch.manual_seed(sum(shape))
        w = torch.randn(*shape)
        mask = transposable_mask_reference(w)
        values, meta = compress_2to4(w, mask)
        assert torch.equal(decode_2to4(values, meta), torch.where(mask, w, 0))


def test_compress_all_zero_weight():
    w = torch.zeros(8, 16)
    values, meta = compress_2to4(w, transposable_mask_reference(w))
    assert torch.equal(decompress_2to4(values, meta), w)


def test_export_reload_gives_training_time_logits(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, tmp_path):
    from nanochat.checkpoint import load_model_for_inference
    from nanochat.flags import build_arg_parser
    from nanochat.train import train
    flags = ["--device-type", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32",
             "--device-batch-size", "4", "--total-batch-size", "128", "--num-iterations", "4", "--eval-every", "-1",
             "--eval-tokens", "128", "--sample-every", "-1", "--sparse", "--sparse-backend", "masked", "--model-tag", "export"]
    train(build_arg_parser().parse_args(flags))
    model, meta = load_model_for_inference(os.path.join(nanochat_base_dir, "base_checkpoints", "export"), device="cpu")
    assert meta["sparse"]
    path = str(tmp_path / "m.safetensors")
    dense, compressed = export_sparse_model(model, path)
    assert compressed / dense == pytest.approx(0.5 + 1 / 32)  # fp32: half the values + 4 bits of indices per group of 4
    from safetensors.torch import load_file
    stored = load_file(path)
    for name in ("transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"):  # the file decodes by the documented format
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(decode_2to4(stored[f"{name}.values"], stored[f"{name}.meta"]), w * transposable_mask_reference(w))
    reloaded = load_sparse_export(path)
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-5)
