"""Conversions on CUDA tensors keep the device (skipped without a GPU)."""

import pytest
import torch

import bndoctor as bd
from bndoctor.models import tiny_resnet
from tests._fakes import randomize_bn

pytestmark = pytest.mark.gpu


def test_conversions_keep_cuda_device_and_outputs():
    model = randomize_bn(tiny_resnet()).cuda().eval()
    x = torch.randn(4, 1, 8, 8, device="cuda")
    folded = bd.fold_bn(model)
    frozen = bd.freeze_bn(model).train()
    grouped = bd.convert_bn(model)
    for converted in (folded, frozen, grouped):
        assert all(p.device.type == "cuda" for p in converted.parameters())
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(frozen(x), model(x))
    assert grouped(x).device.type == "cuda"


def test_converted_accum_bn_opens_its_window_on_the_gpu():
    """The window starts where the layer lives (a first compiled call would otherwise move it and recompile)."""
    model = bd.to_accum_bn(tiny_resnet().cuda())
    windows = [t for m in model.modules() if isinstance(m, bd.AccumBatchNorm) for t in m.window_parts()]
    assert windows and all(w.device.type == "cuda" and w.dtype == torch.float32 for w in windows)


def test_recalibrate_moves_cpu_batches_to_the_model_device():
    torch.manual_seed(0)
    model = tiny_resnet().cuda()
    cpu_batches = [torch.randn(16, 1, 8, 8) + 1 for _ in range(3)]
    report = bd.recalibrate(model, cpu_batches, progress=False)
    assert report.samples == 48 and model.stem[1].running_mean.device.type == "cuda"
    torch.manual_seed(0)
    reference = tiny_resnet()
    bd.recalibrate(reference, cpu_batches, progress=False, exact=True)
    torch.testing.assert_close(model.stem[1].running_var.cpu(), reference.stem[1].running_var, rtol=1e-4, atol=1e-5)


@pytest.fixture
def full_float32():
    """cuDNN convolutions default to TF32 (about 1e-3 relative error): compare float32 with float32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_accumulation_aware_bn_monitor_and_noise_scale_on_cuda(full_float32):
    torch.manual_seed(0)
    cpu = bd.to_accum_bn(tiny_resnet())
    gpu = bd.to_accum_bn(tiny_resnet()).cuda()
    gpu.load_state_dict(cpu.state_dict())
    xs = [torch.randn(2, 1, 8, 8) + k for k in range(4)]
    monitor = bd.BNMonitor(gpu, every=1, keep=True, warmup=0)
    with bd.accumulation_window(cpu), bd.accumulation_window(gpu):
        for x in xs:
            torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), atol=1e-4, rtol=1e-4)
    monitor.close()
    torch.testing.assert_close(gpu.stem[1].running_mean.cpu(), cpu.stem[1].running_mean, atol=1e-5, rtol=1e-4)
    assert len([r for r in monitor.records if r["kind"] == "sample"]) == 4
    optimizer = torch.optim.SGD(gpu.parameters(), lr=0.0)
    gns = bd.GradientNoiseScale(gpu, micro_batch=2, accum_steps=4).attach(optimizer)
    bd.accumulate_bn(gpu, optimizer)
    for x in xs:
        (gpu(x.cuda()).pow(2).mean() / 4).backward()
    optimizer.step()
    assert gns.samples and gns.samples[-1].alpha is not None


def test_check_traces_a_cuda_model_without_moving_it():
    model = tiny_resnet().cuda()
    report = bd.check(model, bd.TrainingSetup(micro_batch=2), input_shape=(1, 8, 8))
    assert report.traced and all(p.device.type == "cuda" for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())


def _micro_steps_and_step(model, optimizer, batches, *, sync_mode_for):
    """Forward + backward of each batch, then the optimizer step, with CUDA's sync debug mode set to "error"
    around the parts named in ``sync_mode_for`` ("micro", "step"): any host-device synchronisation raises."""
    import torch.nn.functional as F

    for part, run in [
        ("micro", lambda: [F.cross_entropy(model(x), y).backward() for x, y in batches]),
        ("step", optimizer.step),
    ]:
        torch.cuda.set_sync_debug_mode("error" if part in sync_mode_for else "default")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")


LAYERS = {
    "accum-renorm": lambda m: bd.to_accum_bn(m, mode="renorm"),
    "accum-progressive": lambda m: bd.to_accum_bn(m, mode="progressive"),
    "accum-blend": lambda m: bd.to_accum_bn(m, mode="blend"),
    "batch-renorm": lambda m: bd.to_batch_renorm(m, warmup_steps=10),
    "frozen": bd.freeze_bn,
}


def _cuda_setup(name, side=8):
    torch.manual_seed(0)
    model = LAYERS[name](tiny_resnet()).cuda().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, foreach=True)
    if name.startswith("accum"):
        bd.accumulate_bn(model, optimizer)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, side, side, generator=gen)
    batches = [(x.cuda(), torch.randint(0, 10, (2,), generator=gen).cuda())]
    _micro_steps_and_step(model, optimizer, batches * 2, sync_mode_for=())  # lazy set-up (handles, window state)
    return model, optimizer, batches * 4


@pytest.mark.parametrize("path", ["folded", "one-pass"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_no_host_device_sync_in_a_cuda_micro_step(name, path, monkeypatch):
    """Both renormalize paths; CUDA inputs take the folded one, so the one-pass node is forced for its run."""
    from bndoctor.layers import _renormalize

    monkeypatch.setattr(_renormalize, "one_pass", lambda x: path == "one-pass")
    model, optimizer, batches = _cuda_setup(name, 64 if path == "one-pass" else 8)
    _micro_steps_and_step(model, optimizer, batches, sync_mode_for=("micro",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["one-pass", "folded"])
def test_renormalize_on_cuda_equals_the_float64_formula(path, dtype, monkeypatch):
    from bndoctor.layers import _batch, _renormalize
    from tests.layers.test_renormalize import EPS, _inputs, _oracle, _run

    monkeypatch.setattr(_renormalize, "one_pass", lambda x: path == "one-pass")
    x, r, d, weight, bias = _inputs((4, 8, 16, 16), seed=3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_in, grad_in = x.to(dtype), grad.to(dtype)

    def on_cuda(x, weight, bias, r, d):
        with torch.no_grad():
            stats = _batch.batch_stats(x, EPS)
        return _renormalize.renormalize(x, weight, bias, r, d, stats, eps=EPS)

    cuda = [t.float().cuda() if t is not None else None for t in (weight, bias, r, d)]
    out, grads = _run(on_cuda, x_in.cuda(), *cuda[:2], *cuda[2:], grad_in.cuda())
    ref, ref_grads = _run(_oracle, x_in.double(), weight, bias, r, d, grad_in.double())
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    assert out.dtype == dtype and grads[0].dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref, **tol)
    for ours, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours.double().cpu(), expected, **tol)


@pytest.mark.parametrize("name", ["accum-renorm", "batch-renorm"])
def test_no_host_device_sync_when_the_optimizer_step_closes_the_window(name):
    model, optimizer, batches = _cuda_setup(name)
    _micro_steps_and_step(model, optimizer, batches, sync_mode_for=("step",))


@pytest.mark.parametrize("name", ["accum-renorm", "accum-renorm-two-passes", "batch-renorm", "frozen"])
def test_compiled_layer_equals_eager_on_cuda(name):
    from tests.layers.test_compile import compare_compiled_with_eager

    compare_compiled_with_eager(name, "cuda")
