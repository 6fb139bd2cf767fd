import copy

import pytest
import torch

import bndoctor as bd
from bndoctor.models import tiny_resnet


def _model():
    torch.manual_seed(0)
    return tiny_resnet()


def _running(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def test_recalibrate_per_domain_then_switch():
    model = _model()
    source = [torch.randn(32, 1, 8, 8) for _ in range(3)]
    target = [-2 * b + 3 for b in source]
    bd.recalibrate(model, source, domain="source", progress=False)
    source_stats = _running(model)
    bd.recalibrate(model, target, domain="target", progress=False)
    target_stats = _running(model)
    assert bd.stats_sets(model) == ["source", "target"]
    with bd.use_stats(model, "source"):
        assert all(torch.equal(v, source_stats[k]) for k, v in _running(model).items())
    assert all(torch.equal(v, target_stats[k]) for k, v in _running(model).items())
    assert bd.load_stats(model, "source")[0] == "stem.1"
    assert all(torch.equal(v, source_stats[k]) for k, v in _running(model).items())


def test_affine_shared_and_state_dict_unchanged():
    model = _model()
    bd.store_stats(model, "a")
    assert set(model.state_dict()) == set(_model().state_dict())
    weight = model.stem[1].weight
    with bd.use_stats(model, "a"):
        assert model.stem[1].weight is weight


def test_use_stats_restores_on_error():
    model = _model()
    bd.store_stats(model, "zero")
    before = _running(model)
    model.stem[1].running_mean.fill_(5.0)
    changed = _running(model)
    with pytest.raises(RuntimeError, match="boom"), bd.use_stats(model, "zero"):
        assert torch.equal(model.stem[1].running_mean, before["stem.1.running_mean"])
        raise RuntimeError("boom")
    assert all(torch.equal(v, changed[k]) for k, v in _running(model).items())


def test_sets_follow_deepcopy_and_export_import_round_trip(tmp_path):
    model = _model()
    bd.recalibrate(model, [torch.randn(16, 1, 8, 8) + 1], domain="target", progress=False)
    clone = copy.deepcopy(model)
    assert bd.stats_sets(clone) == ["target"]
    path = tmp_path / "stats.pt"
    torch.save(bd.export_stats(model), path)
    fresh = _model()
    bd.import_stats(fresh, torch.load(path, weights_only=True))
    bd.load_stats(fresh, "target")
    assert all(torch.equal(v, _running(model)[k]) for k, v in _running(fresh).items())


def test_errors():
    model = _model()
    with pytest.raises(bd.BNDoctorError, match="no BN layer has a statistics set named 'x'"):
        bd.load_stats(model, "x")
    with pytest.raises(bd.BNDoctorError, match=r"without '\.'"):
        bd.store_stats(model, "a.b")
    with pytest.raises(bd.BNDoctorError, match="not a BN layer"):
        bd.import_stats(model, {"t": {"fc": {"running_mean": torch.zeros(1), "running_var": torch.ones(1)}}})
    bad = {"t": {"stem.1": {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}}}
    with pytest.raises(bd.BNDoctorError, match=r"has shape \(3,\), expected \(16,\)"):
        bd.import_stats(model, bad)


def test_modules_selection_limits_the_set():
    model = _model()
    bd.store_stats(model, "stem_only", modules="stem")
    assert bd.load_stats(model, "stem_only") == ["stem.1"]
    assert not any(name.startswith("_bndoctor_stats__") for name in model.layers[0][0].bn1._buffers)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e["b"].update({"stem.1": {"running_mean": torch.zeros(3)}}), "needs tensors running_mean"),
        (lambda e: e["b"].__setitem__("stem.1", "not a dict"), "needs tensors"),
        (lambda e: e.__setitem__("b", [1, 2]), "is not a dict of layers"),
        (lambda e: e["b"]["stem.1"]["running_mean"].fill_(float("nan")), "holds NaN or Inf"),
        (lambda e: e["b"]["stem.1"]["running_var"].fill_(-1.0), "holds negative variances"),
    ],
)
def test_import_is_all_or_nothing_and_checks_every_value(mutate, message):
    model = tiny_resnet()
    bd.recalibrate(model, [torch.randn(8, 1, 8, 8)], progress=False, domain="a")
    bd.recalibrate(model, [torch.randn(8, 1, 8, 8) + 1], progress=False, domain="b")
    exported = bd.export_stats(model)
    mutate(exported)
    fresh = tiny_resnet()
    with pytest.raises(bd.BNDoctorError, match=message):
        bd.import_stats(fresh, exported)
    assert bd.stats_sets(fresh) == []  # set "a" came first and is valid, but nothing was registered
    with pytest.raises(bd.BNDoctorError, match="expected a dict of statistics sets"):
        bd.import_stats(fresh, [("a", {})])
