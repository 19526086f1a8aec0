import torch

from nanochat.gpt import GPT, GPTConfig, config_from_depth


def tiny_config(**kw):
    c = dict(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    c.update(kw)
    return GPTConfig(**c)


def make_model(**kw):
    torch.manual_seed(0)
    model = GPT(tiny_config(**kw))
    model.init_weights()
    return model


def test_config_from_depth_matches_nanochat_sizes():
    dims = {d: config_from_depth(d, 32768, 2048).n_embd for d in (12, 20, 26, 32)}
    assert dims == {12: 768, 20: 1280, 26: 1664, 32: 2048}
    c = config_from_depth(26, 32768, 2048)
    assert c.n_head == 13 and c.n_embd // c.n_head == 128


def test_logits_and_loss_shapes():
    model = make_model()
    idx = torch.randint(0, 96, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 96) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # tanh soft-cap
    loss = model(idx, idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    per_token = model(idx, idx, loss_reduction="none")
    assert per_token.shape == (48,)
    assert torch.allclose(per_token.mean(), loss)


def test_param_count_by_hand():
    V, d, L = 96, 64, 2
    model = make_model()
    per_layer = 4 * d * d + 2 * 4 * d * d  # attention q,k,v,proj + mlp fc, proj
    assert model.num_params() == 2 * V * d + L * per_layer


def param_count_from_config(c):
    """Embedding and lm_head (vocab x width each); per layer: q and the output projection (width x width),
    k and v (kv heads x head dim x width each), the MLP (width -> 4 x width -> width)."""
    head_dim = c.n_embd // c.n_head
    attn = 2 * c.n_embd * c.n_embd + 2 * c.n_kv_head * head_dim * c.n_embd
    return 2 * c.vocab_size * c.n_embd + c.n_layer * (attn + 8 * c.n_embd * c.n_embd)


def test_grouped_query_heads_param_count():
    model = make_model(n_head=4, n_kv_head=2)
    d, hd = 64, 16
    attn = model.transformer.h[0].attn
    assert attn.c_k.weight.shape == (2 * hd, d)
    assert model(torch.randint(0, 96, (1, 8))).shape == (1, 8, 96)
    # k and v have 2 heads of 16, not 4: 2 * 32 * 64 fewer weights per layer than full multi-head attention
    assert model.num_params() == param_count_from_config(model.config) == 2 * 96 * 64 + 2 * (12 * 64 * 64 - 2 * 32 * 64)
    for kw in (dict(), dict(n_head=4, n_kv_head=1), dict(n_layer=3, n_embd=96, n_head=3, n_kv_head=3)):
        assert make_model(**kw).num_params() == param_count_from_config(tiny_config(**kw)), kw


def test_flops_estimate_by_hand():
    V, d, L, T = 96, 64, 2, 32
    model = make_model()
    matmul_params = V * d + L * 12 * d * d  # lm_head + blocks; the embedding is a lookup
    attn = 12 * L * 2 * 32 * T  # 12 * layers * heads * head_dim * seq_len
    assert model.estimate_flops() == 6 * matmul_params + attn


def test_output_projections_start_at_zero():
    model = make_model()
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().sum() == 0
        assert block.mlp.c_proj.weight.abs().sum() == 0
    assert [n for n, m in model.named_modules() if n.endswith(".mlp.c_fc")] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]


def test_causality():
    model = make_model()
    with torch.no_grad():
        for block in model.transformer.h:  # make the model non-trivial
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
    idx = torch.randint(0, 96, (1, 12))
    idx2 = idx.clone()
    idx2[0, 8:] = (idx2[0, 8:] + 1) % 96
    a, b = model(idx), model(idx2)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-5)


def test_kv_cache_generation_equals_full_recompute():
    model = _nontrivial_model()
    prompt = [1, 5, 7, 9]
    cached = list(model.generate(prompt, max_tokens=10, temperature=0.0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_tiny_overfit_loss_falls():
    from nanochat.optim import setup_optimizers
    model = make_model()
    opts = setup_optimizers(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.02)
    idx = torch.randint(0, 96, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def _nontrivial_model():
    model = make_model()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.5)  # logits large enough for the soft-cap to bend them
    return model


def test_training_loss_and_grads_match_the_full_logits_formula():
    """The model's loss (chunked, nanochat/loss.py) against the old formula on its full logits."""
    import torch.nn.functional as F
    model = _nontrivial_model()
    idx, y = torch.randint(0, 96, (3, 16)), torch.randint(0, 96, (3, 16))
    y[0, :4] = -1  # ignored targets count neither in the sum nor in the mean's denominator
    loss = model(idx, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    old = F.cross_entropy(model(idx).view(-1, 96), y.view(-1), ignore_index=-1)
    old.backward()
    torch.testing.assert_close(loss, old, rtol=1e-6, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    with torch.no_grad():
        per_token = model(idx, y, loss_reduction="none")
        old_per_token = F.cross_entropy(model(idx).view(-1, 96), y.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_token, old_per_token, rtol=1e-6, atol=1e-6)


def test_compiled_model_gives_the_eager_loss_and_grads():
    """torch.compile (inductor on CPU, one graph) of the model with the chunked loss: same training
    loss and gradients as eager, and the per-token eval losses under no_grad."""
    model = _nontrivial_model()
    idx, y = torch.randint(0, 96, (4, 32)), torch.randint(0, 96, (4, 32))
    eager = model(idx, y)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    loss = compiled(idx, y)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx, y, loss_reduction="none"), model(idx, y, loss_reduction="none"),
                                   rtol=1e-5, atol=1e-5)
