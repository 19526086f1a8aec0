import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.experimental.act_stats import ActSparsity, fractions, group_sums, measure, mlp_projections, prune_2of4
from nanochat.gpt import GPT, GPTConfig

# One token of 16 features = 4 groups of 4, each with a known count of non-zeros.
H = torch.tensor([[0., 0., 0., 0.,    # 0 non-zeros
                   3., 0., 0., 1.,    # 2: pruning keeps it as is
                   1., 2., 3., 4.,    # 4: pruning drops 1 and 2
                   0., 5., 0., 0.]])  # 1
H_PRUNED = torch.tensor([[0., 0., 0., 0., 3., 0., 0., 1., 0., 0., 3., 4., 0., 5., 0., 0.]])


def test_prune_2of4_by_hand():
    assert torch.equal(prune_2of4(H), H_PRUNED)
    three = torch.tensor([1., 0., 2., 3.])  # 3 non-zeros: the smallest goes
    assert torch.equal(prune_2of4(three), torch.tensor([0., 0., 2., 3.]))


def test_prune_2of4_leaves_at_most_2_per_group_and_is_idempotent():
    torch.manual_seed(0)
    h = F.relu(torch.randn(5, 7, 32)).square()
    p = prune_2of4(h)
    assert p.shape == h.shape
    assert ((p.view(5, 7, 8, 4) != 0).sum(-1) <= 2).all()
    assert torch.equal(prune_2of4(p), p)
    assert ((p == h) | (p == 0)).all()  # only drops, never changes a kept value


def test_stats_by_hand():
    r = fractions(group_sums(H))
    assert r["zero_frac"] == 9 / 16
    assert r["nnz_hist"] == [1 / 4, 1 / 4, 1 / 4, 0, 1 / 4]
    assert r["groups_le2_frac"] == 3 / 4
    assert r["dropped_l2_frac"] == pytest.approx(5 / 65)  # (1² + 2²) / (3² + 1² + 1² + 2² + 3² + 4² + 5²)
    assert r["dropped_l1_frac"] == pytest.approx(3 / 19)


def test_stats_add_up_over_tokens_chunks_and_bf16():
    torch.manual_seed(0)
    h = F.relu(torch.randn(3, 10, 64)).square()
    whole = fractions(group_sums(h))
    chunked = group_sums(h[:1], chunk_rows=3)
    chunked = fractions(group_sums(h[1:], chunked, chunk_rows=7))
    assert whole["nnz_hist"] == chunked["nnz_hist"] and whole["zero_frac"] == chunked["zero_frac"]
    for k in ("dropped_l2_frac", "dropped_l1_frac"):
        assert whole[k] == pytest.approx(chunked[k], rel=1e-6)
    assert 0.4 < whole["zero_frac"] < 0.6  # relu of a symmetric distribution
    bf16 = fractions(group_sums(h.bfloat16()))
    assert bf16["zero_frac"] == whole["zero_frac"] and bf16["nnz_hist"] == whole["nnz_hist"]
    with pytest.raises(ValueError, match="multiple of 4"):
        group_sums(torch.ones(2, 6))


def test_out_rel_err_by_hand():
    proj = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.eye(16))  # c_proj(h) = h, so the error is the dropped h itself
    with ActSparsity([proj]) as stats:
        out = proj(H)
    assert torch.equal(out, H)
    (r,) = stats.result()
    assert r["tokens"] == 1 and r["zero_frac"] == 9 / 16
    assert r["out_rel_err"] == pytest.approx(math.sqrt(5 / 65))
    with ActSparsity([proj], prune=True):
        assert torch.equal(proj(H), H_PRUNED)
    assert torch.equal(proj(H), H)  # hooks gone


def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=96, n_layer=3, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # c_proj starts at zero: give the MLPs an output to measure
        for proj in mlp_projections(model):
            proj.weight.normal_(std=0.05)
        model.transformer.h[1].mlp.c_fc.weight.zero_()  # layer 1: h is all zeros
    return model


def test_hooks_leave_the_model_unchanged_and_see_each_layer():
    model = tiny_model()
    x = torch.randint(0, 96, (2, 32))
    y = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        logits, loss = model(x), model(x, y)
    with ActSparsity(mlp_projections(model)) as stats, torch.no_grad():
        assert torch.equal(model(x), logits)
        assert torch.equal(model(x, y), loss)
    layers = stats.result()
    assert [r["tokens"] for r in layers] == [128, 128, 128]  # two calls of 64 tokens
    assert layers[1]["zero_frac"] == 1.0 and layers[1]["groups_le2_frac"] == 1.0
    assert layers[1]["dropped_l2_frac"] is None and layers[1]["out_rel_err"] is None  # nothing to drop or output
    for r in (layers[0], layers[2]):
        assert 0.2 < r["zero_frac"] < 0.8 and 0 < r["groups_le2_frac"] < 1 and 0 < r["out_rel_err"] < 1
    with torch.no_grad():
        assert torch.equal(model(x), logits)  # hooks removed on exit


def test_measure_pruned_loss_matches_a_pruned_mlp_forward():
    model = tiny_model()
    batches = [(torch.randint(0, 96, (2, 32)), torch.randint(0, 96, (2, 32))) for _ in range(2)]
    r = measure(model, batches)
    with torch.no_grad():
        dense = sum(model(x, y).item() for x, y in batches) / 2
        for block in model.transformer.h:  # the reference: each MLP written out with the pruning inside
            mlp = block.mlp
            mlp.forward = lambda v, mlp=mlp: mlp.c_proj(prune_2of4(F.relu(mlp.c_fc(v)).square()))
        pruned = sum(model(x, y).item() for x, y in batches) / 2
    assert r["tokens"] == 128 and len(r["layers"]) == 3
    assert r["loss"] == pytest.approx(dense, rel=1e-6)
    assert r["loss_pruned"] == pytest.approx(pruned, rel=1e-6)
    assert r["loss_pruned"] != pytest.approx(r["loss"], rel=1e-6)  # the pruning did something
    assert model.training  # measure() restores the mode


def test_benchmark_runs_and_its_step0_is_the_trainers_init(tiny_data_dir, tiny_tokenizer, nanochat_base_dir, tmp_path):
    from benchmarks.experimental.act_sparsity import init_model, main
    from nanochat import checkpoint
    out = str(tmp_path / "act_{device}_d{depth}")
    # all learning rates 0: the weights saved after step 1 are still the init, which step 0 must rebuild exactly
    flags = ["--device-type", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32",
             "--device-batch-size", "4", "--total-batch-size", "256", "--save-every", "1", "--eval-batches", "2",
             "--model-tag", "act_sparsity_test", "--out", out, "--extra", "--matrix-lr 0 --embedding-lr 0 --unembedding-lr 0"]
    result = main(flags + ["--steps", "2"])
    assert [p["step"] for p in result["points"]] == [0, 1, 2]
    assert all(p["tokens"] == 2 * 4 * 32 and len(p["layers"]) == 2 for p in result["points"])
    assert result["points"][1]["layers"] == result["points"][0]["layers"]
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"act_cpu_d2.{ext}").exists()
    ckpt = os.path.join(nanochat_base_dir, "base_checkpoints", "act_sparsity_test")
    saved, _, meta = checkpoint.load_checkpoint(ckpt, 1, "cpu", load_optimizer=False)
    rebuilt = init_model(meta, torch.device("cpu")).state_dict()
    assert all(torch.equal(rebuilt[k], v) for k, v in saved.items())
    # a run cut off continues from its newest checkpoint
    resumed = main(flags + ["--steps", "3", "--resume"])
    assert [p["step"] for p in resumed["points"]] == [0, 1, 2, 3] and resumed["meta"]["resumed_from_step"] == 2
    assert resumed["train"]["step"] == [3]
