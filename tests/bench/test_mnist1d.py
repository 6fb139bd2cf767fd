"""MNIST-1D in the harness: the data set generated offline, the 1D ResNet, the scenario families."""

import numpy as np
import pytest
import torch

from bndoctor.models import resnet1d

pytest.importorskip("mnist1d")


def test_mnist1d_is_generated_offline_with_the_papers_split_and_leaves_global_rng_alone():
    import random

    from bndoctor.bench.data import load_mnist1d

    load_mnist1d.cache_clear()
    np.random.seed(123)
    random.seed(123)
    before = (np.random.get_state()[1].copy(), random.getstate())
    data = load_mnist1d()
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    assert data.x_train.shape == (4000, 1, 40) and data.x_val.shape == (1000, 1, 40)
    assert data.num_classes == 10 and set(data.y_train.tolist()) == set(range(10))
    assert abs(float(data.x_train.mean())) < 0.05 and abs(float(data.x_train.std()) - 1) < 0.05
    shifted = load_mnist1d("shifted")
    assert shifted.x_train.shape == data.x_train.shape and not torch.equal(shifted.x_train, data.x_train)
    assert torch.equal(load_mnist1d().x_train, data.x_train)  # deterministic


def test_resnet1d_uses_batchnorm1d_and_fits_sequences():
    model = resnet1d()
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in model.modules()) == 9  # stem, 3 blocks x 2, 2 shortcuts
    assert model(torch.randn(2, 1, 40)).shape == (2, 10)
    assert resnet1d(norm="group")(torch.randn(2, 1, 40)).shape == (2, 10)


def test_mnist1d_scenario_families_are_registered():
    from bndoctor.bench.scenarios import MNIST1D_CORE, SCENARIOS, resolve

    names = {s.name for s in resolve(["mnist1d", "mnist1d-sweep", "mnist1d-finetune", "mnist1d-distributed"])}
    assert set(MNIST1D_CORE) <= names
    for family in ("m1d-accbn-progressive-2x32-corr", "m1d-accbn-blend-2x32-iid", "m1d-accbn-2pass-2x32-corr",
                   "m1d-sweep-bn-2", "m1d-sweep-gn-32", "m1d-ft-bn-frozen-2x32-corr-recal", "m1d-syncbn-2x8x4-corr",
                   "m1d-accbn-sync-2x8x4-corr"):  # fmt: skip
        assert family in names
    assert all(SCENARIOS[n].dataset == "mnist1d" for n in names)
    assert SCENARIOS["m1d-bn-2x32-corr"].label() == "BN 2x32 correlated (MNIST-1D)"


def test_a_short_mnist1d_run_trains_the_1d_model():
    import dataclasses

    from bndoctor.bench.runner import run_scenario
    from bndoctor.bench.scenarios import SCENARIOS

    result, state = run_scenario(dataclasses.replace(SCENARIOS["m1d-bn-64"], epochs=1), 0)
    assert result.final_acc > 0.3  # one epoch already beats the paper's logistic regression (32 %)
    assert state["stem.1.running_mean"].shape == (32,)


def test_a_diverging_run_is_recorded_not_a_crash():
    """A learning rate far too high makes the weights NaN: recalibration refuses, the run says it diverged."""
    import dataclasses
    import math

    pytest.importorskip("sklearn")
    from bndoctor.bench.runner import run_scenario
    from bndoctor.bench.scenarios import SCENARIOS

    scenario = dataclasses.replace(SCENARIOS["bn-64"], lr=1e8, epochs=3, recalibrate=True)
    result, _ = run_scenario(scenario, 0)
    assert result.extra["diverged_epoch"] >= 1 and len(result.val_acc) == 3
    assert any(math.isnan(v) for v in result.train_loss) or result.extra["diverged_epoch"] < 3
