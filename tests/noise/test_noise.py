"""Gradient noise scale and tail index against problems with known answers; advice; `bndoctor noise`."""

import json
import math

import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor.cli import main
from bndoctor.noise import GradientNoiseScale, advise, tail_index
from tests._dist import run_ranks


def _regression(d=20, sigma=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=gen)
    w = nn.Parameter(w_star + 0.3 * torch.randn(d, generator=gen))
    return w_star, w, gen


def _analytic_b_simple(w, w_star, sigma):
    # per-sample gradient (w.x - y) x with x ~ N(0, I), y = w*.x + sigma eps: G = delta,
    # E|g|^2 = (d + 2)|delta|^2 + sigma^2 d, so tr(Sigma) = (d + 1)|delta|^2 + sigma^2 d
    delta = (w - w_star).detach().double()
    d = delta.numel()
    return float(((d + 1) * delta.pow(2).sum() + sigma**2 * d) / delta.pow(2).sum())


@pytest.mark.parametrize(("micro", "accum"), [(4, 8), (1, 16), (16, 2)])
def test_b_simple_matches_the_analytic_value_on_linear_regression(micro, accum):
    sigma = 0.5
    w_star, w, gen = _regression(sigma=sigma)
    optimizer = torch.optim.SGD([w], lr=0.0)  # fixed weights: a stationary problem
    gns = GradientNoiseScale([w], micro_batch=micro, accum_steps=accum, beta=0.99, tail_coordinates=0)
    gns.attach(optimizer)
    for _ in range(1500):
        for _ in range(accum):
            x = torch.randn(micro, w.numel(), generator=gen)
            y = x @ w_star + sigma * torch.randn(micro, generator=gen)
            (0.5 * (x @ w - y).pow(2).mean() / accum).backward()
        optimizer.step()
        optimizer.zero_grad()
    truth = _analytic_b_simple(w, w_star, sigma)
    assert gns.b_simple == pytest.approx(truth, rel=0.10), (gns.b_simple, truth)
    assert len(gns.samples) == 1500 and gns.samples[-1].alpha is None
    gns.detach()
    assert not w._backward_hooks


def _stable(alpha, n, seed):
    """Symmetric alpha-stable samples (Chambers, Mallows and Stuck 1976)."""
    gen = torch.Generator().manual_seed(seed)
    u = (torch.rand(n, generator=gen, dtype=torch.float64) - 0.5) * math.pi
    w = -torch.log(torch.rand(n, generator=gen, dtype=torch.float64))
    return (
        torch.sin(alpha * u) / torch.cos(u) ** (1 / alpha) * (torch.cos((1 - alpha) * u) / w) ** ((1 - alpha) / alpha)
    )


@pytest.mark.parametrize("alpha", [1.2, 1.5, 2.0])
def test_tail_index_recovers_stable_alpha(alpha):
    for seed in range(3):
        assert tail_index(_stable(alpha, 100_000, seed)) == pytest.approx(alpha, abs=0.15)


def test_tail_index_bad_input():
    with pytest.raises(bd.BNDoctorError, match="at least 16"):
        tail_index(torch.zeros(100))
    with pytest.raises(bd.BNDoctorError, match="tensor"):
        tail_index([1.0, 2.0])
    with pytest.raises(bd.BNDoctorError, match="block"):
        tail_index(torch.randn(100), block=80)


def test_tail_index_from_training_gradients_is_recorded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    gns = GradientNoiseScale(model, micro_batch=2, accum_steps=8, tail_coordinates=200).attach(optimizer)
    for _ in range(5):
        for _ in range(8):
            x = torch.randn(2, 10)
            (model(x).pow(2).mean() / 8).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(s.alpha is not None and 0 < s.alpha <= 2 for s in gns.samples)
    assert gns.alpha is not None and math.isfinite(gns.b_simple)


def test_bad_setups_are_refused_with_a_hint():
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(bd.BNDoctorError, match="two batch sizes"):
        GradientNoiseScale([w], micro_batch=8, accum_steps=1, world_size=1)
    with pytest.raises(bd.BNDoctorError, match="no parameter"):
        GradientNoiseScale([nn.Parameter(torch.zeros(3), requires_grad=False)], micro_batch=2, accum_steps=2)
    with pytest.raises(bd.BNDoctorError, match="micro_batch"):
        GradientNoiseScale([w], micro_batch=0, accum_steps=2)
    gns = GradientNoiseScale([w], micro_batch=2, accum_steps=2)
    with pytest.raises(bd.BNDoctorError, match="Optimizer"):
        gns.attach("sgd")
    gns.attach(torch.optim.SGD([w], lr=0.1))
    with pytest.raises(bd.BNDoctorError, match="attached already"):
        gns.attach(torch.optim.SGD([w], lr=0.1))
    assert math.isnan(gns.b_simple)
    gns._ema_weight, gns._ema_g2, gns._ema_trace = 1.0, -0.1, 2.0  # noise dominates the |G|^2 estimate
    assert gns.b_simple == math.inf


def _ddp_rank(rank, world_size):
    from torch.nn.parallel import DistributedDataParallel

    sigma, micro, accum = 0.5, 4, 4
    w_star, _, _ = _regression(sigma=sigma)
    torch.manual_seed(0)
    module = nn.Linear(20, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(w_star + 0.3)
    model = DistributedDataParallel(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    gns = GradientNoiseScale(model, micro_batch=micro, accum_steps=accum, beta=0.99, tail_coordinates=0)
    gns.attach(optimizer)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(600):
        for k in range(accum):
            x = torch.randn(micro, 20, generator=gen)
            y = x @ w_star + sigma * torch.randn(micro, generator=gen)
            context = model.no_sync() if k < accum - 1 else __import__("contextlib").nullcontext()
            with context:
                (0.5 * (model(x).squeeze(1) - y).pow(2).mean() / accum).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"b_simple": gns.b_simple, "b_big": gns.b_big, "truth": _analytic_b_simple(module.weight[0], w_star, sigma)}


def test_under_ddp_the_large_batch_spans_the_ranks():
    results = run_ranks(_ddp_rank, 2)
    for r in results:
        assert not isinstance(r, BaseException), r
        assert r["b_big"] == 4 * 4 * 2
        assert r["b_simple"] == pytest.approx(r["truth"], rel=0.15)


def test_advice():
    codes = lambda findings: [f.code for f in findings]  # noqa: E731
    assert codes(advise(8, 400.0)) == ["BS101"]
    assert codes(advise(4096, 400.0)) == ["BS102"]
    assert codes(advise(256, 400.0)) == []
    assert codes(advise(256, 400.0, finetune=True)) == ["BS103"]
    assert codes(advise(16384, math.nan)) == ["BS104"]
    assert codes(advise(256, 400.0, alpha=1.5)) == ["BS105"]
    assert codes(advise(256, math.inf)) == ["BS101"] and "too large to measure" in advise(256, math.inf)[0].message
    finding = advise(8, 400.0)[0]
    assert finding.evidence["steps_over_min"] == pytest.approx(51.0)


def test_cli_noise(capsys):
    assert main(["noise", "--epochs", "1", "--accum", "4", "--micro-batch", "4", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["logical_batch"] == 16 and data["b_simple"] > 0 and len(data["epochs"]) == 1
    assert "BS101" in [f["code"] for f in data["advice"]]
    assert main(["noise", "--epochs", "1", "--accum", "2"]) == 0
    out = capsys.readouterr().out
    assert "B_simple" in out and "tail index alpha" in out
    assert main(["noise", "--micro-batch", "1"]) == 2
    assert "micro_batch >= 2" in capsys.readouterr().err


def test_one_non_finite_window_does_not_stick_in_the_averages():
    class Frozen(torch.optim.Optimizer):  # steps without changing the weights (an Inf gradient would, even at lr 0)
        def __init__(self, params):
            super().__init__(params, {})

        def step(self, closure=None):
            return None

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = Frozen(model.parameters())
    gns = GradientNoiseScale(model, micro_batch=2, accum_steps=2).attach(optimizer)
    for step in range(6):
        for _ in range(2):
            x = torch.randn(2, 4)
            if step == 2:
                x[0, 0] = float("inf")
            (model(x).pow(2).mean() / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert gns.skipped_steps == 1 and not math.isfinite(gns.samples[2].g2_big)
    assert math.isfinite(gns.b_simple) and math.isfinite(gns.samples[-1].b_simple)
