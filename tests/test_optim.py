import io

import pytest
import torch

from nanochat.optim import Muon, lr_multiplier, zeropower_via_newtonschulz5
from tests.gloo_workers import spawn_gloo

# odd counts of one shape (3, 3, 1) and shapes split over two param groups
SHAPES = [(8, 16)] * 3 + [(16, 8)] * 5 + [(12, 12)] + [(6, 10)] * 2
STEPS = 3


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


def make_params():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def step_grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def make_muon(params, **kw):
    groups = [dict(params=params[:6]), dict(params=params[6:], lr=0.01, weight_decay=0.1)]
    return Muon(groups, lr=0.02, momentum=0.9, **kw)


def run_steps(opt, params, steps):
    for step in steps:
        for p, g in zip(params, step_grads(step)):
            p.grad = g
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_equals_the_stacked_step(nesterov):
    """Against Muon's step before the foreach version (stack every shape's grads and buffers, update,
    copy back), which bench_optim keeps as its 'before' baseline."""
    from benchmarks.bench_optim import StackedMuon
    params, ref_params = make_params(), make_params()
    opt = make_muon(params, nesterov=nesterov)
    ref = StackedMuon([dict(params=ref_params[:6]), dict(params=ref_params[6:], lr=0.01, weight_decay=0.1)],
                      lr=0.02, momentum=0.9, nesterov=nesterov)
    run_steps(opt, params, range(STEPS))
    run_steps(ref, ref_params, range(STEPS))
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=0, atol=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"], rtol=0, atol=0)


def test_muon_state_dict_round_trip():
    params, resumed_params = make_params(), make_params()
    opt = make_muon(params)
    run_steps(opt, params, range(2))
    saved = io.BytesIO()  # as a checkpoint does: through torch.save, so no buffer is shared with opt
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    with torch.no_grad():
        for p, q in zip(resumed_params, params):
            p.copy_(q)
    resumed = make_muon(resumed_params)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    run_steps(opt, params, range(2, 4))
    run_steps(resumed, resumed_params, range(2, 4))
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def sharded_steps(rank, world):
    params = make_params()
    opt = make_muon(params, shard=True)
    run_steps(opt, params, range(STEPS))
    return dict(params=[p.detach() for p in params], state=opt.state_dict())


def test_sharded_muon_on_two_processes_equals_one_process(tmp_path):
    """Each rank orthogonalizes its share and all-gathers: every rank ends with the params and
    optimizer state (all momentum buffers) of the unsharded optimizer."""
    results = spawn_gloo(sharded_steps, 2, tmp_path)
    params = make_params()
    opt = make_muon(params)
    run_steps(opt, params, range(STEPS))
    state = opt.state_dict()
    for out in results:
        # the same math per matrix, in batches of another size: equal up to the batched matmul's rounding
        for p, q in zip(params, out["params"]):
            torch.testing.assert_close(q, p.detach(), rtol=1e-6, atol=1e-7)
        assert out["state"]["param_groups"] == state["param_groups"]
        for i, s in state["state"].items():
            torch.testing.assert_close(out["state"]["state"][i]["momentum_buffer"], s["momentum_buffer"],
                                       rtol=1e-6, atol=1e-7)
