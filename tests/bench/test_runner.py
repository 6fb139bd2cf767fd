import dataclasses

import pytest
import torch

import bndoctor as bd
from bndoctor.bench import SCENARIOS, Scenario, get_scenario, register, resolve, run_scenario, run_suite
from bndoctor.bench.runner import RunResult

TINY = Scenario("test-tiny", "a tiny run for tests", micro_batch=8, accum_steps=2, sampler="correlated", epochs=2)


def test_same_seed_same_numbers_and_seeds_differ():
    a, state_a = run_scenario(TINY, 0)
    b, state_b = run_scenario(TINY, 0)
    c, _ = run_scenario(TINY, 1)
    assert a.val_acc == b.val_acc and a.train_loss == b.train_loss
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a.train_loss != c.train_loss
    assert len(a.val_acc) == 2 and 0.0 <= a.final_acc <= 1.0
    assert a.train_loss[1] < a.train_loss[0]  # it learns


def test_run_restores_global_torch_settings():
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    run_scenario(dataclasses.replace(TINY, micro_batch=2, epochs=1, accum_steps=1), 0)
    assert torch.get_num_threads() == threads and torch.backends.mkldnn.enabled == mkldnn


def test_bn_eval_keeps_running_statistics_untouched():
    scenario = dataclasses.replace(TINY, bn_eval=True, epochs=1)
    _, state = run_scenario(scenario, 0)
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if k.endswith("running_mean"))
    assert all(int(v) == 0 for k, v in state.items() if k.endswith("num_batches_tracked"))


def test_finetune_starts_from_the_pretrained_state_and_applies_the_remedy():
    pretrain = dataclasses.replace(SCENARIOS["bn-64"], epochs=1)
    _, source_state = run_scenario(pretrain, 0)
    ft = dataclasses.replace(SCENARIOS["ft-bn-frozen-2x32-corr"], epochs=1, micro_batch=8, accum_steps=8)
    result, state = run_scenario(ft, 0, init_state=source_state)
    running = [k for k in state if k.endswith("running_mean") or k.endswith("running_var")]
    assert running and all(torch.equal(state[k], source_state[k]) for k in running)  # frozen
    # the pretrained model's accuracy on the target before any update, from an independent evaluation
    from bndoctor.bench.data import load_data
    from bndoctor.bench.runner import model_for

    data = load_data("digits", "shifted")
    model = model_for(data)
    model.load_state_dict(source_state)
    model.eval()
    with torch.no_grad():
        expected = (model(data.x_val).argmax(1) == data.y_val).float().mean().item()
    assert result.extra["start_acc"] == pytest.approx(expected)


def test_suite_adds_pretraining_dependency_and_parallel_equals_serial():
    ft = dataclasses.replace(SCENARIOS["ft-bn-train-2x32-iid"], micro_batch=16, accum_steps=4)
    progress = []
    serial = run_suite([ft], [0], jobs=1, epochs=1, progress=lambda d, t, label: progress.append((d, t)))
    assert [s.name for s in serial.scenarios] == ["bn-64", "ft-bn-train-2x32-iid"]
    assert progress[-1][0] == progress[-1][1]
    parallel = run_suite([ft], [0], jobs=2, epochs=1)
    assert [r.val_acc for r in serial.runs] == [r.val_acc for r in parallel.runs]
    summary = serial.summary("ft-bn-train-2x32-iid")
    assert summary["seeds"] == 1 and summary["final_sd"] == 0.0


def test_result_json_round_trip():
    result = RunResult("x", 3, [0.5, 0.7], [1.0, 0.8], 1.5)
    assert RunResult.from_json(result.to_json()) == result
    assert result.last5_mean == pytest.approx(0.6) and result.last5_std == pytest.approx(0.1)


class TestRegistry:
    def test_resolve_names_groups_globs(self):
        assert [s.name for s in resolve(["bn-64"])] == ["bn-64"]
        assert len(resolve(["sweep"])) == 15
        assert {s.name for s in resolve(["ft-*-iid"])} == {"ft-bn-train-2x32-iid", "ft-bn-frozen-2x32-iid"}

    def test_unknown_scenario_lists_choices(self):
        with pytest.raises(bd.BNDoctorError, match="unknown scenario 'nope'") as e:
            resolve(["nope"])
        assert "bn-64" in e.value.hint

    def test_register_guards(self):
        with pytest.raises(bd.BNDoctorError, match="already registered"):
            register(SCENARIOS["bn-64"])
        with pytest.raises(bd.BNDoctorError, match="unknown scenario 'missing'"):
            register(Scenario("x-new", "", pretrain="missing"))
        with pytest.raises(bd.BNDoctorError, match="micro_batch >= 2"):
            register(Scenario("x-one", "", micro_batch=1))
        assert get_scenario("bn-64").logical_batch == 64

    def test_labels(self):
        assert SCENARIOS["bn-2x32-corr"].label() == "BN 2x32 correlated"
        assert SCENARIOS["ft-bn-frozen-2x32-corr"].label() == "BN 2x32 correlated + frozen_bn"
        assert SCENARIOS["bn-eval-2x32-corr"].label() == "BN (eval) 2x32 correlated"


def test_multi_rank_scenario_with_sync_bn_keeps_ranks_identical():
    scenario = dataclasses.replace(SCENARIOS["syncbn-2x8x4-corr"], world_size=2, micro_batch=8, accum_steps=2, epochs=1)
    epochs = []
    result, state = run_scenario(scenario, 0, on_epoch=epochs.append)
    assert epochs == [1] and result.extra["world_size"] == 2
    first, second = result.extra["rank_val_acc"]
    assert first == second == result.val_acc  # SyncBN: the same statistics on every rank
    assert "bn.running_mean" not in state and "stem.1.running_mean" in state
    assert scenario.logical_batch == 32 and scenario.label() == "SyncBN 8x2x2 ranks correlated"
