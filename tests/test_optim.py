import pytest
import torch

from nanochat.optim import Muon, lr_multiplier, zeropower_via_newtonschulz5


def test_newton_schulz_is_nearly_orthogonal():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32), (48, 48)]:
        X = zeropower_via_newtonschulz5(torch.randn(*shape))
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration lands singular values near 1


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_muon_steps_reduce_a_quadratic():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(16, 32))
    target = torch.randn(16, 32)
    opt = Muon([W], lr=0.2)
    first = None
    for _ in range(100):
        loss = ((W - target) ** 2).sum()
        first = first or loss.item()
        loss.backward()
        opt.step()
        W.grad = None
    assert loss.item() < 0.2 * first


def test_lr_schedule_shape():
    n = 100
    m = [lr_multiplier(s, n, warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.1) for s in range(n + 1)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in m[10:51])
    assert m[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(m[50:], m[51:]))  # warmdown is monotone
