import pytest
import torch
import torch.nn as nn

import bndoctor as bd
from bndoctor._walk import select
from tests._fakes import BatchNormAct2d, MMStyleSyncBN, ThirdPartyFrozenBN2d


def _kinds(model):
    return {r.name: r.kind for r in bd.find_bn(model)}


def test_find_bn_recognises_every_torch_batchnorm_class():
    lazy_done = nn.LazyBatchNorm2d()
    lazy_done(torch.randn(2, 5, 3, 3))
    model = nn.ModuleDict(
        {
            "b1": nn.BatchNorm1d(3),
            "b2": nn.BatchNorm2d(4, momentum=None),
            "b3": nn.BatchNorm3d(5, affine=False, track_running_stats=False),
            "sync": nn.SyncBatchNorm(6),
            "lazy": nn.LazyBatchNorm1d(),
            "lazy_done": lazy_done,
            "inorm": nn.InstanceNorm2d(4, track_running_stats=True),  # not BN
            "gn": nn.GroupNorm(2, 4),
        }
    )
    records = {r.name: r for r in bd.find_bn(model)}
    assert list(records) == ["b1", "b2", "b3", "sync", "lazy", "lazy_done"]
    assert records["b1"].dims == 1 and records["b2"].dims == 2 and records["b3"].dims == 3
    assert records["b2"].momentum is None
    assert records["b3"].affine is False and records["b3"].track_running_stats is False
    assert records["b3"].uses_batch_stats
    assert records["sync"].kind == "sync"
    assert records["lazy"].kind == "lazy" and not records["lazy"].supported
    assert "forward pass" in records["lazy"].reason
    assert records["lazy_done"].kind == "batchnorm" and records["lazy_done"].num_features == 5


def test_find_bn_recognises_third_party_layers_by_behaviour():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), ThirdPartyFrozenBN2d(4), MMStyleSyncBN(4))
    records = bd.find_bn(model)
    assert [(r.name, r.kind) for r in records] == [("1", "batchnorm"), ("2", "frozen"), ("3", "bn-like")]
    assert records[1].frozen and records[1].num_features == 4 and not records[1].uses_batch_stats
    assert not records[2].supported and "_BatchNorm" in records[2].reason
    assert records[0].cls.endswith("BatchNormAct2d")


def test_shared_module_reported_once_with_aliases():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Sequential(bn), nn.ModuleList([nn.ReLU(), bn]))
    (record,) = bd.find_bn(model)
    assert record.name == "0.0" and record.aliases == ("1.1",)


def test_root_bn_has_empty_name():
    assert [r.name for r in bd.find_bn(nn.BatchNorm1d(3))] == [""]


@pytest.mark.parametrize("bad", [None, {"a": 1}, [nn.BatchNorm2d(2)], nn.BatchNorm2d(2).state_dict()])
def test_non_module_is_a_clear_type_error(bad):
    with pytest.raises(bd.errors.NotAModuleError, match=r"torch.nn.Module \(got"):
        bd.find_bn(bad)
    with pytest.raises(TypeError):  # also a TypeError for callers who catch that
        bd.freeze_bn(bad)


def test_as_dict_is_json_ready():
    import json

    (record,) = bd.find_bn(nn.Sequential(nn.BatchNorm2d(2)))
    data = json.loads(json.dumps(record.as_dict()))
    assert data["name"] == "0" and data["num_features"] == 2 and data["class"].endswith("BatchNorm2d")


class TestSelect:
    model = nn.ModuleDict(
        {
            "backbone": nn.Sequential(nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm2d(3))),
            "head": nn.Sequential(nn.BatchNorm1d(4)),
        }
    )

    def names(self, modules):
        return [r.name for r in select(bd.find_bn(self.model), modules)]

    def test_prefix_glob_exact_callable(self):
        assert self.names(None) == ["backbone.0", "backbone.1.0", "head.0"]
        assert self.names("backbone") == ["backbone.0", "backbone.1.0"]
        assert self.names("backbone.*.0") == ["backbone.1.0"]
        assert self.names(["head.0", "backbone.0"]) == ["backbone.0", "head.0"]
        assert self.names(lambda n, m: isinstance(m, nn.BatchNorm1d)) == ["head.0"]

    def test_prefix_does_not_match_partial_words(self):
        with pytest.raises(bd.errors.ModuleSelectionError, match="'back' matches no BatchNorm layer"):
            self.names("back")

    def test_typo_is_an_error_listing_layers(self):
        with pytest.raises(bd.errors.ModuleSelectionError, match=r"backbone\.0"):
            self.names(["head", "haed"])

    def test_non_string_entries_rejected(self):
        with pytest.raises(bd.errors.ModuleSelectionError, match="got int"):
            self.names([1])


class TestReplaceModule:
    def test_sequential_modulelist_moduledict(self):
        model = nn.ModuleDict({"a": nn.Sequential(nn.ModuleList([nn.ReLU(), nn.BatchNorm2d(2)]))})
        out = bd.replace_module(model, "a.0.1", nn.Identity())
        assert out is model and isinstance(model["a"][0][1], nn.Identity)

    def test_plain_attribute(self):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn = nn.BatchNorm2d(2)

        net = Net()
        bd.replace_module(net, "bn", nn.Identity())
        assert isinstance(net.bn, nn.Identity)

    def test_shared_module_replaced_by_one_object_at_both_paths(self):
        bn = nn.BatchNorm2d(2)
        model = nn.Sequential(nn.Sequential(bn), bn)
        new = nn.Identity()
        bd.replace_module(model, "1", new)
        assert model[0][0] is new and model[1] is new

    def test_root_replacement_returns_new_root(self):
        new = nn.Identity()
        assert bd.replace_module(nn.BatchNorm2d(2), "", new) is new

    def test_unknown_path_is_clear(self):
        with pytest.raises(bd.errors.ModuleSelectionError, match=r"no submodule at 'x\.y'"):
            bd.replace_module(nn.Sequential(nn.ReLU()), "x.y", nn.Identity())

    def test_new_must_be_module(self):
        with pytest.raises(bd.errors.NotAModuleError, match="`new`"):
            bd.replace_module(nn.Sequential(nn.ReLU()), "0", "relu")


@pytest.mark.parametrize("bad", [123, 1.5, object()])
def test_a_selection_of_the_wrong_type_is_a_clear_error(bad):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    for operation in (bd.freeze_bn, bd.convert_bn, bd.to_sync_bn, bd.fold_bn):
        with pytest.raises(bd.errors.ModuleSelectionError, match="expected `modules` to be a name") as info:
            operation(model, modules=bad)
        assert "layer3.*.bn2" in info.value.hint
