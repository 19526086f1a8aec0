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
    reloaded = load_sparse_export(path)
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-5, atol=1e-5)
