"""The exact accumulation mode against batch-N BatchNorm itself (float64), on three networks, one of them timm's."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bndoctor as bd
from bndoctor.models import resnet1d
from tests._thirdparty import timm


def _chain() -> nn.Module:
    """4 x (Conv1d-BN-ReLU) + linear: the probe of issue #30."""
    layers: list[nn.Module] = []
    width = 1
    for _ in range(4):
        layers += [nn.Conv1d(width, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()]
        width = 8
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 16, 4))


def _window(shape: tuple[int, ...], k: int = 4, n: int = 2, classes: int = 4, seed: int = 0):
    """k micro-batches of n samples, one class per micro-batch, classes apart in their means (correlated)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn((n, *shape), generator=g, dtype=torch.float64) + 0.5 * (i % classes) for i in range(k)]
    ys = [torch.full((n,), i % classes) for i in range(k)]
    return xs, ys


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _reference(model: nn.Module, xs, ys) -> nn.Module:
    """Batch-N BatchNorm: the window as one batch, the mean loss."""
    ref = copy.deepcopy(model).train()
    F.cross_entropy(ref(torch.cat(xs)), torch.cat(ys)).backward()
    return ref


def _exact(model: nn.Module, xs, ys, *, passes=None, collect=True):
    """The same window in micro-batches with the exact mode; returns (model, optimizer, handle) before the step."""
    acc = bd.to_accum_bn(model, mode="exact", passes=passes, warm_start=False).train()
    opt = torch.optim.SGD(acc.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    handle = bd.accumulate_bn(acc, opt)
    if collect:
        bd.collect_window(acc, xs)
    for x, y in zip(xs, ys):
        (F.cross_entropy(acc(x), y) / len(xs)).backward()
    return acc, opt, handle


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _timm_lcnet() -> nn.Module:
    return timm().create_model("lcnet_035", pretrained=False, num_classes=4)


NETWORKS = {
    "chain": (_chain, (1, 16)),
    "resnet1d": (lambda: resnet1d(4), (1, 40)),
    "timm-lcnet_035": (_timm_lcnet, (3, 32, 32)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_exact_mode_equals_batch_n_batchnorm_in_float64(name):
    """Gradient, running statistics and one SGD step with momentum: batch-N BN's to 1e-9 relative."""
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    model = build().double()
    xs, ys = _window(shape)
    ref = _reference(model, xs, ys)
    acc, opt, handle = _exact(model, xs, ys)
    assert handle.correct() > 1  # several passes were needed, and the step below does not correct again
    assert _relative(_flat_grad(acc), _flat_grad(ref)) < 1e-9
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt.step()
    opt.step()
    for (name_a, a), (_, b) in zip(acc.named_parameters(), ref.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name_a
    bns = [m for m in acc.modules() if isinstance(m, bd.AccumBatchNorm)]
    refs = [m for m in ref.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == len(refs) > 3
    for a, b in zip(bns, refs):
        assert torch.allclose(a.running_mean, b.running_mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(a.running_var, b.running_var, rtol=1e-9, atol=1e-12)
        assert not a.window_open


def test_passes_buy_exactness_step_by_step():
    """Each pass corrects what the previous one implied: the error falls with the passes and is 0 at the depth."""
    torch.manual_seed(1)
    model = _chain().double()
    xs, ys = _window((1, 16), k=8)
    target = _flat_grad(_reference(model, xs, ys))
    errors = []
    for passes in (0, 1, 2, 3, 4):
        acc, _, handle = _exact(model, xs, ys, passes=passes)
        assert handle.correct() == passes
        errors.append(_relative(_flat_grad(acc), target))
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.05
    assert errors[-1] < 1e-12  # 4 BN layers in a chain: 4 passes are exact
    acc, _, handle = _exact(model, xs, ys, passes=None)
    assert handle.correct() == 4  # None stops once nothing is left to correct


def test_without_collect_the_forward_uses_the_window_so_far():
    """No collect_window: micro-batch k is normalised with micro-batches 1..k, so batch N is not reached."""
    torch.manual_seed(2)
    model = _chain().double()
    xs, ys = _window((1, 16))
    target = _flat_grad(_reference(model, xs, ys))
    acc, _, handle = _exact(model, xs, ys, collect=False)
    handle.correct()
    assert _relative(_flat_grad(acc), target) > 1e-3


class _Dropped(nn.Module):
    """BN layers with dropout between them: the replays must draw the gradient pass's masks again."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.b = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        h = self.a(x)
        self.seen.append(h.detach().clone())
        return self.head(self.b(h))


def test_replays_draw_the_same_dropout_masks_and_restore_the_generator():
    torch.manual_seed(3)
    model = bd.to_accum_bn(_Dropped().double(), mode="exact")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = bd.accumulate_bn(model, opt)
    xs = [torch.randn(4, 6, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        model(x).square().mean().backward()
    recorded = list(model.seen)
    state = torch.get_rng_state()
    model.seen.clear()
    passes = handle.correct()
    assert passes == 2
    assert torch.equal(torch.get_rng_state(), state)  # the user's random stream goes on as if nothing ran
    assert len(model.seen) == passes * len(xs)
    for i, seen in enumerate(model.seen):
        assert torch.equal(seen, recorded[i % len(xs)])


def test_step_corrects_once_and_clipping_loops_correct_first():
    torch.manual_seed(4)
    model = _chain().double()
    xs, ys = _window((1, 16))
    acc, opt, handle = _exact(model, xs, ys)
    assert bd.correct_window(acc) == 4
    corrected = _flat_grad(acc).clone()
    assert bd.correct_window(acc) == 0  # once per window
    calls = []
    handle.replay.correct = lambda params: calls.append(1) or 0  # type: ignore[method-assign]
    before = [p.detach().clone() for p in acc.parameters()]
    opt.step()
    assert not any(layer.window_open for layer in acc.modules() if isinstance(layer, bd.AccumBatchNorm))
    assert torch.equal(_flat_grad(acc), corrected)
    assert any(not torch.equal(a, b) for a, b in zip(acc.parameters(), before))


def test_accumulation_window_block_corrects_at_its_end():
    torch.manual_seed(5)
    model = _chain().double()
    xs, ys = _window((1, 16))
    target = _flat_grad(_reference(model, xs, ys))
    acc = bd.to_accum_bn(model, mode="exact", warm_start=False)
    with bd.accumulation_window(acc):
        bd.collect_window(acc, xs)
        for x, y in zip(xs, ys):
            (F.cross_entropy(acc(x), y) / len(xs)).backward()
    assert _relative(_flat_grad(acc), target) < 1e-9


def test_exact_mode_options_are_checked():
    model = _chain()
    with pytest.raises(bd.BNDoctorError, match="needs mode='exact'"):
        bd.to_accum_bn(model, passes=2)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(bd.BNDoctorError, match="expected passes"):
            bd.to_accum_bn(model, mode="exact", passes=bad)
    with pytest.raises(bd.BNDoctorError, match="'exact'"):
        bd.to_accum_bn(model, mode="exactly")
    with pytest.raises(bd.BNDoctorError, match="no exact-mode"):
        bd.correct_window(bd.to_accum_bn(model))
    with pytest.raises(bd.BNDoctorError, match="nothing records"):
        bd.correct_window(bd.to_accum_bn(model, mode="exact"))
    assert "mode=exact, passes=2" in repr(bd.to_accum_bn(model, mode="exact", passes=2)[1])


def test_a_model_that_calls_its_layers_differently_in_the_replay_is_refused():
    class Moody(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return self.bn(x) if self.calls <= 2 else self.bn(self.bn(x))

    model = bd.to_accum_bn(Moody(), mode="exact")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bd.accumulate_bn(model, opt)
    for _ in range(2):
        model(torch.randn(4, 3)).pow(3).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(bd.BNDoctorError, match="calls 'bn' more often than the recorded window"):
        opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))  # left as the gradient pass made it
    assert model.bn._replay is None


def _ddp_rank(rank: int, world: int, state, xs, ys):
    from torch.nn.parallel import DistributedDataParallel

    model = _chain().double()
    model.load_state_dict(state)
    acc = bd.to_accum_bn(model, mode="exact", sync=True, warm_start=False)
    net = DistributedDataParallel(acc)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = bd.accumulate_bn(net, opt)
    mine = list(range(rank, len(xs), world))
    bd.collect_window(acc, [xs[i] for i in mine])
    for j, i in enumerate(mine):
        with net.no_sync() if j < len(mine) - 1 else torch.enable_grad():
            (F.cross_entropy(net(xs[i]), ys[i]) / len(mine)).backward()  # DDP averages over the ranks
    passes = handle.correct()
    grad = _flat_grad(acc).clone()
    opt.step()
    layers = [m for m in acc.modules() if isinstance(m, bd.AccumBatchNorm)]
    return passes, grad, [(m.running_mean.clone(), m.running_var.clone()) for m in layers]


def test_exact_mode_under_ddp_equals_batch_n_over_all_ranks():
    """2 ranks x 2 micro-batches of 2, windows pooled across the ranks: batch-8 BatchNorm's gradient (float64)."""
    from tests._dist import run_ranks

    torch.manual_seed(6)
    model = _chain().double()
    xs, ys = _window((1, 16), k=4)
    ref = _reference(model, xs, ys)
    results = run_ranks(_ddp_rank, 2, model.state_dict(), xs, ys, timeout=60)
    for result in results:
        assert not isinstance(result, BaseException), result
        passes, grad, running = result
        assert passes == 4
        assert _relative(grad, _flat_grad(ref)) < 1e-9
        refs = [m for m in ref.modules() if isinstance(m, nn.BatchNorm1d)]
        for (mean, var), b in zip(running, refs):
            assert torch.allclose(mean, b.running_mean, rtol=1e-9, atol=1e-12)
            assert torch.allclose(var, b.running_var, rtol=1e-9, atol=1e-12)


def test_exact_mode_under_torch_compile_matches_eager():
    """A compiled model: the exact layers run eagerly inside the compiled graph, and the gradient is the same."""
    torch.manual_seed(7)
    model = _chain()
    xs, ys = _window((1, 16))
    xs = [x.float() for x in xs]
    grads = []
    for compiled in (False, True):
        acc = bd.to_accum_bn(model, mode="exact", warm_start=False)
        net = torch.compile(acc, backend="aot_eager") if compiled else acc
        opt = torch.optim.SGD(acc.parameters(), lr=0.1)
        handle = bd.accumulate_bn(net, opt)
        bd.collect_window(net, xs)
        for x, y in zip(xs, ys):
            (F.cross_entropy(net(x), y) / len(xs)).backward()
        assert handle.correct() == 4
        grads.append(_flat_grad(acc))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def _lightning_module(lightning, model):
    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


def test_lightning_callback_corrects_each_window_before_clipping(tmp_path):
    """Lightning runs the last micro-batch inside optimizer.step(closure): the callback corrects after it,
    before gradient clipping, so one Lightning step equals a plain loop that corrects, clips and steps."""
    lightning = pytest.importorskip("lightning")
    from bndoctor.integrations.lightning import BNMonitorCallback

    torch.manual_seed(8)
    model = bd.to_accum_bn(_chain(), mode="exact", passes=2)
    xs, ys = _window((1, 16))
    xs = [x.float() for x in xs]
    manual = copy.deepcopy(model)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1)
    handle = bd.accumulate_bn(manual, opt)
    for x, y in zip(xs, ys):
        (F.cross_entropy(manual(x), y) / 2).backward()  # Lightning divides by accumulate_grad_batches too
        if len(handle.replay.calls) == 2:
            assert bd.correct_window(manual) == 2
            torch.nn.utils.clip_grad_norm_(manual.parameters(), 0.05)
            opt.step()
            opt.zero_grad()

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=2)
    callback = BNMonitorCallback(every=100, check=False)
    module = _lightning_module(lightning, model)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=data)
    (attached,) = callback.attached
    assert attached.steps == 2 and attached.replay is None  # detached at the end of fit
    for (name, a), b in zip(module.net.named_parameters(), manual.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_a_closure_step_without_the_callback_warns_that_the_window_went_uncorrected():
    torch.manual_seed(9)
    model = bd.to_accum_bn(_chain(), mode="exact", passes=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bd.accumulate_bn(model, opt)
    x, y = _window((1, 16), k=1)
    x = x[0].float()

    def closure():
        loss = F.cross_entropy(model(x), y[0])
        loss.backward()
        return loss

    with pytest.warns(bd.BNDoctorWarning, match="did not correct this window"):
        opt.step(closure)


def test_the_monitor_does_not_count_replays():
    torch.manual_seed(10)
    model = bd.to_accum_bn(_chain(), mode="exact")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bd.accumulate_bn(model, opt)
    xs, ys = _window((1, 16))
    with bd.BNMonitor(model, every=1, warmup=0, log=False) as monitor:
        for x, y in zip(xs, ys):
            F.cross_entropy(model(x.float()), y).backward()
        opt.step()
        assert monitor.forwards == len(xs)


def test_a_window_closed_by_hand_starts_the_next_recording_afresh():
    torch.manual_seed(11)
    model = bd.to_accum_bn(_chain(), mode="exact", passes=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = bd.accumulate_bn(model, opt)
    xs, ys = _window((1, 16))
    F.cross_entropy(model(xs[0].float()), ys[0]).backward()
    from bndoctor.remedies import close_windows

    close_windows(model)
    F.cross_entropy(model(xs[1].float()), ys[1]).backward()
    assert len(handle.replay.calls) == 1
    assert handle.correct() == 1


def test_optimizer_step_alone_corrects_even_after_a_switch_to_eval_mode():
    """The step's pre-hook replays with gradients on, in the modes the window ran in; the modes come back."""
    torch.manual_seed(12)
    model = _chain().double()
    xs, ys = _window((1, 16))
    ref = _reference(model, xs, ys)
    torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3).step()
    acc, opt, _ = _exact(model, xs, ys)
    acc.eval()
    with torch.no_grad():
        opt.step()
    assert not acc.training and not acc[1].training
    for a, b in zip(acc.parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_double_backward_is_refused_in_the_exact_mode():
    model = bd.to_accum_bn(_chain(), mode="exact")
    bd.accumulate_bn(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 1, 16, requires_grad=True)
    with pytest.raises(bd.BNDoctorError, match="double backward"):
        torch.autograd.grad(model(x).square().sum(), x, create_graph=True)


def test_a_replay_that_calls_a_layer_less_often_names_it_and_leaves_every_layer():
    class Skipping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.BatchNorm1d(3)
            self.second = nn.BatchNorm1d(3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            x = self.first(x)
            return self.second(x) if self.calls <= 2 else x

    model = bd.to_accum_bn(Skipping(), mode="exact")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bd.accumulate_bn(model, opt)
    for _ in range(2):
        model(torch.randn(4, 3)).pow(3).sum().backward()
    with pytest.raises(bd.BNDoctorError, match="called 'second' 0 times, the recorded one 2 times"):
        opt.step()
    assert model.first._replay is None and model.second._replay is None
