"""Learning-rate schedules: hand-computed lr values per step, and exact resume from a state dict."""

from __future__ import annotations

import math

import pytest
import torch

from dfine.config.registry import LR_SCHEDULERS, LR_WARMUPS, ConfigError
from dfine.engine.schedules import (
    FlatCosineLR,
    FlatCosineLRScheduler,
    LinearWarmup,
    LRSchedule,
    MultiStepLR,
    build_lr_schedule,
    lr_blocks,
)


def make_optimizer(*lrs: float) -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0])


def lr_per_step(schedule: LRSchedule, epochs: int, group: int = 0) -> list[float]:
    """The lr each optimisation step runs with, stepping the schedule as the trainer does."""
    seen = []
    for _ in range(epochs):
        for _ in range(schedule.steps_per_epoch):
            seen.append(schedule.optimizer.param_groups[group]["lr"])
            schedule.step()
        schedule.epoch_step()
    return seen


def test_linear_warmup_then_multistep_decay_at_the_milestone_epoch():
    optimizer = make_optimizer(0.1)
    schedule = LRSchedule(
        optimizer, steps_per_epoch=3, epochs=4, decay=MultiStepLR([2], 0.1), warmup=LinearWarmup(4)
    )
    expected = [0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    assert lr_per_step(schedule, 4) == pytest.approx(expected, rel=1e-12)


def test_flat_then_cosine_reaches_min_lr_at_the_last_step():
    optimizer = make_optimizer(1.0)
    schedule = LRSchedule(
        optimizer, steps_per_epoch=2, epochs=4, decay=FlatCosineLR(flat_epochs=2, min_lr_ratio=0.1)
    )
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(4)]
    assert lr_per_step(schedule, 4) == pytest.approx([1.0, 1.0, 1.0, 1.0, *cosine], rel=1e-12)
    assert cosine[-1] == pytest.approx(0.1)


def test_every_group_keeps_its_own_base_lr_in_proportion():
    optimizer = make_optimizer(0.1, 0.01)
    schedule = LRSchedule(
        optimizer, steps_per_epoch=2, epochs=2, decay=MultiStepLR([1], 0.5), warmup=LinearWarmup(2)
    )
    assert lr_per_step(schedule, 2, group=1) == pytest.approx([0.005, 0.01, 0.005, 0.005], rel=1e-12)


def test_state_dict_round_trip_resumes_the_exact_lr_sequence():
    def fresh() -> LRSchedule:
        return LRSchedule(
            make_optimizer(0.1, 0.02),
            steps_per_epoch=5,
            epochs=6,
            decay=MultiStepLR([2, 4], 0.1),
            warmup=LinearWarmup(7),
        )

    reference = fresh()
    uninterrupted = lr_per_step(reference, 6)
    first = fresh()
    before = lr_per_step(first, 3)
    state = first.state_dict()
    resumed = fresh()
    resumed.load_state_dict(state)
    after = lr_per_step(resumed, 3)
    assert before + after == uninterrupted  # bit for bit
    assert resumed.optimizer.param_groups[1]["lr"] == reference.optimizer.param_groups[1]["lr"]


def test_describe_reports_total_and_warmup_steps_and_milestones():
    schedule = LRSchedule(
        make_optimizer(0.1),
        steps_per_epoch=100,
        epochs=72,
        decay=MultiStepLR([500], 0.1),
        warmup=LinearWarmup(2000),
    )
    summary = schedule.describe()
    assert summary["total_steps"] == 7200
    assert summary["warmup_steps"] == 2000
    assert summary["milestones"] == [500]
    assert summary["milestone_steps"] == [50000]
    assert summary["gamma"] == 0.1


def test_built_from_the_original_config_blocks():
    optimizer = make_optimizer(0.1)
    schedule = build_lr_schedule(
        optimizer,
        {"type": "MultiStepLR", "milestones": [1], "gamma": 0.5},
        {"type": "LinearWarmup", "warmup_duration": 2},
        steps_per_epoch=2,
        epochs=2,
    )
    assert lr_per_step(schedule, 2) == pytest.approx([0.05, 0.1, 0.05, 0.05])


def test_unknown_scheduler_type_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="MultiStepLR"):
        build_lr_schedule(make_optimizer(0.1), {"type": "MultiStepLr", "milestones": [1]}, None, 1, 1)
    with pytest.raises(ConfigError, match="bad arguments"):
        build_lr_schedule(make_optimizer(0.1), {"type": "MultiStepLR", "milestone": [1]}, None, 1, 1)


def test_schedules_are_looked_up_in_their_registries_so_a_warmup_is_no_lr_scheduler():
    names = ["FlatCosineLR", "FlatCosineLRScheduler", "MultiStepLR"]
    assert LR_SCHEDULERS.names == names and LR_WARMUPS.names == ["LinearWarmup"]
    with pytest.raises(ConfigError, match=r"unknown lr scheduler type 'LinearWarmup'.*" + ", ".join(names)):
        build_lr_schedule(make_optimizer(0.1), {"type": "LinearWarmup", "warmup_duration": 2}, None, 1, 1)
    with pytest.raises(ConfigError, match=r"lr_warmup_scheduler: bad arguments for LinearWarmup.*missing"):
        build_lr_schedule(make_optimizer(0.1), None, {"type": "LinearWarmup"}, 1, 1)


def test_a_schedule_constructor_check_keeps_its_own_message():
    with pytest.raises(ConfigError, match=r"lr_scheduler\.milestones must be increasing, got \[3, 1\]"):
        build_lr_schedule(make_optimizer(0.1), {"type": "MultiStepLR", "milestones": [3, 1]}, None, 1, 1)


@pytest.mark.original
def test_matches_the_original_warmup_and_multistep_when_warmup_ends_in_the_first_epoch(original):
    from src.optim.warmup import LinearWarmup as OriginalWarmup

    steps_per_epoch, epochs = 5, 4
    reference_optimizer = make_optimizer(0.1, 0.01)
    step_decay = torch.optim.lr_scheduler.MultiStepLR(reference_optimizer, milestones=[2], gamma=0.1)
    warmup = OriginalWarmup(step_decay, warmup_duration=3)
    expected = []
    for _ in range(epochs):  # the original det_solver / det_engine stepping order
        for _ in range(steps_per_epoch):
            expected.append([group["lr"] for group in reference_optimizer.param_groups])
            reference_optimizer.step()  # no gradients: changes nothing, keeps torch's step-order check quiet
            warmup.step()
        if warmup.finished():
            step_decay.step()

    optimizer = make_optimizer(0.1, 0.01)
    schedule = LRSchedule(
        optimizer, steps_per_epoch, epochs, decay=MultiStepLR([2], 0.1), warmup=LinearWarmup(3)
    )
    ours = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            ours.append([group["lr"] for group in optimizer.param_groups])
            schedule.step()
        schedule.epoch_step()
    assert len(ours) == len(expected) == 20
    for step, (mine, theirs) in enumerate(zip(ours, expected, strict=True)):
        assert mine == pytest.approx(theirs, rel=1e-12), f"step {step}"


# ------------------------------------------------------------------------------------ DEIM's flat-cosine
def deim_schedule(**kwargs: float) -> LRSchedule:
    args = {"lr_gamma": 0.5, "warmup_iter": 2, "flat_epochs": 2, "no_aug_epochs": 1, **kwargs}
    return LRSchedule(make_optimizer(1.0), 4, 5, decay=FlatCosineLRScheduler(**args))


def test_deim_flat_cosine_warms_up_quadratically_stays_flat_decays_and_ends_at_the_floor():
    # 4 steps x 5 epochs: warm-up to step 2, flat to step 8 (2 epochs), cosine over steps 9..15, floor 16..19
    cosine = [0.5 + 0.25 * (1 + math.cos(math.pi * (k - 8) / 8)) for k in range(9, 16)]
    expected = [0.0, 0.25, 1.0, 1, 1, 1, 1, 1, 1, *cosine, 0.5, 0.5, 0.5, 0.5]
    assert lr_per_step(deim_schedule(), 5) == pytest.approx(expected, rel=1e-12)
    # lr_gamma 1 (DEIM's N) keeps the lr flat after the warm-up
    assert set(lr_per_step(deim_schedule(lr_gamma=1.0), 5)[3:]) == {1.0}


def test_deim_schedule_refuses_a_second_warmup_and_bad_values():
    with pytest.raises(ConfigError, match="lr_warmup_scheduler: null"):
        build_lr_schedule(
            make_optimizer(0.1),
            {"type": "FlatCosineLRScheduler", "warmup_iter": 10},
            {"type": "LinearWarmup", "warmup_duration": 5},
            steps_per_epoch=2,
            epochs=2,
        )
    with pytest.raises(ConfigError, match="lr_gamma"):
        FlatCosineLRScheduler(lr_gamma=2.0)
    with pytest.raises(ConfigError, match="flat_epochs"):
        FlatCosineLRScheduler(flat_epochs=-1)


@pytest.mark.deim
def test_deim_flat_cosine_equals_deims_own_schedule(deim):
    from engine.optim.lr_scheduler import FlatCosineLRScheduler as DeimScheduler

    steps_per_epoch, epochs = 7, 12
    ours = LRSchedule(make_optimizer(0.2, 0.05), steps_per_epoch, epochs,
                      decay=FlatCosineLRScheduler(0.5, 10, 5, 3))  # fmt: skip
    theirs_optimizer = make_optimizer(0.2, 0.05)
    for group in theirs_optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    theirs = DeimScheduler(theirs_optimizer, 0.5, steps_per_epoch, epochs, 10, 5, 3)
    for step in range(steps_per_epoch * epochs):
        theirs.step(step, theirs_optimizer)
        for mine, other in zip(ours.get_last_lr(), theirs_optimizer.param_groups, strict=True):
            assert mine == pytest.approx(other["lr"], rel=1e-12, abs=1e-15), step
        ours.step()


def test_deims_top_level_lr_keys_become_the_flat_cosine_block():
    cfg = {
        "lrsheduler": "flatcosine",
        "lr_gamma": 0.5,
        "warmup_iter": 2000,
        "flat_epoch": 29,
        "no_aug_epoch": 8,
    }
    block, warmup = lr_blocks(cfg)
    assert warmup is None
    assert block == {"type": "FlatCosineLRScheduler", "lr_gamma": 0.5, "warmup_iter": 2000, "flat_epochs": 29,
                     "no_aug_epochs": 8}  # fmt: skip
    schedule = build_lr_schedule(make_optimizer(1.0), block, warmup, steps_per_epoch=100, epochs=58)
    assert isinstance(schedule.decay, FlatCosineLRScheduler) and schedule.decay.flat_steps == 2900
    with pytest.raises(ConfigError, match="both set a schedule"):
        lr_blocks({**cfg, "lr_scheduler": {"type": "MultiStepLR", "milestones": [500]}})
    with pytest.raises(ConfigError, match="needs lrsheduler: flatcosine"):
        lr_blocks({"flat_epoch": 29})
    assert lr_blocks({"lr_scheduler": {"type": "MultiStepLR"}}) == ({"type": "MultiStepLR"}, None)
