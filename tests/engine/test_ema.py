"""ModelEMA: decay ramp, copy-only start, a restart that really restarts, and the checkpoint layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfine.config.registry import EMAS, ConfigError
from dfine.engine.ema import ModelEMA, build_ema


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def shift_weights(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(amount)


def test_decay_ramp_follows_decay_times_one_minus_exp():
    ema = ModelEMA(tiny_model(), decay=0.999, warmups=100)
    for updates in (1, 10, 100, 1000):
        assert ema.current_decay(updates) == pytest.approx(0.999 * (1 - math.exp(-updates / 100)), rel=1e-12)
    assert ModelEMA(tiny_model(), decay=0.9, warmups=0).current_decay(1) == 0.9


def test_update_averages_parameters_and_running_stats_with_the_ramped_decay():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.99, warmups=10)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    shift_weights(model, 1.0)
    with torch.no_grad():
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    decay = 0.99 * (1 - math.exp(-1 / 10))
    current = model.state_dict()
    for key, value in ema.module.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, decay * before[key] + (1 - decay) * current[key])
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied, not averaged
    assert ema.updates == 1


def test_updates_before_start_copy_the_weights_then_averaging_begins():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.9, warmups=0, start=2)
    for step in range(2):
        shift_weights(model, 1.0)
        ema.update(model)
        torch.testing.assert_close(ema.module[0].weight, model[0].weight, msg=f"copy at update {step}")
    assert ema.updates == 0
    previous = ema.module[0].weight.clone()
    shift_weights(model, 1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, 0.9 * previous + 0.1 * model[0].weight)


def test_restart_resets_the_ramp_and_sets_the_new_decay():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.9999, warmups=5)
    for _ in range(50):
        ema.update(model)
    assert ema.current_decay() == pytest.approx(0.9999, rel=1e-4)
    ema.restart(decay=0.999)
    assert ema.updates == 0 and ema.decay == 0.999
    previous = ema.module[0].weight.clone()
    shift_weights(model, 1.0)
    ema.update(model)
    first = 0.999 * (1 - math.exp(-1 / 5))  # the ramp starts again from update 1
    torch.testing.assert_close(ema.module[0].weight, first * previous + (1 - first) * model[0].weight)


def test_state_dict_has_the_original_layout_and_round_trips():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.99, warmups=10)
    shift_weights(model, 0.5)
    ema.update(model)
    ema.restart(0.95)
    ema.update(model)
    state = ema.state_dict()
    assert set(state) >= {"module", "updates", "decay", "warmups"}
    assert list(state["module"]) == list(model.state_dict())  # same key names as the model (no prefix)
    other = ModelEMA(tiny_model(), decay=0.5, warmups=1)
    other.load_state_dict(state)
    assert (other.updates, other.decay, other.warmups) == (1, 0.95, 10)
    for key, value in state["module"].items():
        torch.testing.assert_close(other.module.state_dict()[key], value)


def test_loads_an_original_checkpoint_ema_entry_with_module_and_updates_only():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.9999, warmups=2000)
    ema.load_state_dict({"module": tiny_model().state_dict(), "updates": 1234})
    assert ema.updates == 1234 and ema.decay == 0.9999 and ema.warmups == 2000


def test_wrapped_model_is_unwrapped_and_the_copy_is_frozen_in_eval_mode():
    model = tiny_model()
    wrapped = nn.DataParallel(model)  # same unwrapping path as DistributedDataParallel
    ema = ModelEMA(wrapped)
    assert list(ema.module.state_dict()) == list(model.state_dict())
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    shift_weights(model, 1.0)
    ema.update(wrapped)
    assert ema.updates == 1


def test_restart_without_a_decay_uses_restart_decay_from_the_block():
    ema = build_ema({"type": "ModelEMA", "decay": 0.9999, "warmups": 5, "restart_decay": 0.99}, tiny_model())
    assert isinstance(ema, ModelEMA) and ema.decay == 0.9999 and ema.restart_decay == 0.99
    ema.restart()
    assert ema.decay == 0.99 and ema.updates == 0
    ema.restart(0.9)  # an explicit decay still wins
    assert ema.decay == 0.9


def test_restart_without_any_restart_decay_keeps_the_decay():
    ema = ModelEMA(tiny_model(), decay=0.999)
    ema.restart()
    assert ema.decay == 0.999


def test_build_ema_goes_through_the_registry_and_rejects_an_unknown_type_or_argument():
    assert EMAS.get("ModelEMA") is ModelEMA
    with pytest.raises(ConfigError, match=r"unknown ema type 'EMA'.*Registered ema types: ModelEMA"):
        build_ema({"type": "EMA"}, tiny_model())
    with pytest.raises(
        ConfigError, match=r"ema\.decai is not an argument of ModelEMA\. Did you mean 'decay'"
    ):
        build_ema({"type": "ModelEMA", "decai": 0.9}, tiny_model())
    with pytest.raises(ConfigError, match=r"ema\.decay must be in \[0, 1\), got 1\.5"):
        build_ema({"type": "ModelEMA", "decay": 1.5}, tiny_model())


def test_no_ema_block_gives_the_defaults():
    ema = build_ema(None, tiny_model())
    assert (ema.decay, ema.warmups, ema.start, ema.restart_decay) == (0.9999, 1000, 0, None)


@pytest.mark.original
def test_matches_the_original_model_ema_over_several_updates(original):
    from src.optim.ema import ModelEMA as OriginalEMA

    model = tiny_model()
    ours, theirs = ModelEMA(model, decay=0.99, warmups=3), OriginalEMA(model, decay=0.99, warmups=3)
    for step in range(6):
        shift_weights(model, 0.1 * (step + 1))
        with torch.no_grad():
            model[1].running_var.mul_(1.1)
        ours.update(model)
        theirs.update(model)
    expected = theirs.module.state_dict()
    for key, value in ours.module.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value, expected[key], msg=key)
    assert ours.state_dict()["updates"] == theirs.state_dict()["updates"] == 6
