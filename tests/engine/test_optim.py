"""Regex parameter groups (original D-FINE config shape), optimiser construction and batch-size scaling."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dfine.config import Config
from dfine.config.registry import OPTIMIZERS, ConfigError
from dfine.engine.optim import build_optimizer, group_summary, param_groups_from_config, scale_for_batch_size

# The regexes of the original configs/dfine/include/optimizer.yml.
BACKBONE_NO_NORM = "^(?=.*backbone)(?!.*norm).*$"
HEAD_NORMS = "^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$"


class Stage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class TinyDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.ModuleDict({"stem": Stage(), "stage1": Stage()})
        self.encoder = Encoder()
        self.decoder = nn.ModuleDict({"head": nn.Linear(4, 2), "bn": nn.BatchNorm1d(2)})


def optimizer_block(**overrides):
    block = {
        "type": "AdamW",
        "params": [{"params": BACKBONE_NO_NORM, "lr": 1e-5}, {"params": HEAD_NORMS, "weight_decay": 0.0}],
        "lr": 2.5e-4,
        "betas": [0.9, 0.999],
        "weight_decay": 1.25e-4,
    }
    block.update(overrides)
    return block


def test_regex_groups_select_the_expected_parameters():
    groups = param_groups_from_config(TinyDetector(), optimizer_block())
    assert [g.pattern for g in groups] == [BACKBONE_NO_NORM, HEAD_NORMS, None]
    assert groups[0].names == [
        "backbone.stem.conv.weight",
        "backbone.stem.conv.bias",
        "backbone.stage1.conv.weight",
        "backbone.stage1.conv.bias",
    ]
    assert groups[1].names == [
        "encoder.norm.weight",
        "encoder.norm.bias",
        "decoder.bn.weight",
        "decoder.bn.bias",
    ]
    assert groups[2].names == [
        "backbone.stem.norm.weight",
        "backbone.stem.norm.bias",
        "backbone.stage1.norm.weight",
        "backbone.stage1.norm.bias",
        "encoder.proj.weight",
        "encoder.proj.bias",
        "decoder.head.weight",
        "decoder.head.bias",
    ]


def test_optimizer_groups_carry_their_own_settings_and_the_default_group_the_top_level_ones():
    model = TinyDetector()
    optimizer = build_optimizer(model, optimizer_block())
    assert isinstance(optimizer, torch.optim.AdamW)
    lrs = [g["lr"] for g in optimizer.param_groups]
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    assert lrs == [1e-5, 2.5e-4, 2.5e-4]
    assert decays == [1.25e-4, 0.0, 1.25e-4]
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_a_parameter_matched_by_two_groups_is_rejected_naming_it_and_both_regexes():
    block = optimizer_block(
        params=[{"params": "backbone", "lr": 1e-5}, {"params": "norm", "weight_decay": 0.0}]
    )
    with pytest.raises(ConfigError) as error:
        param_groups_from_config(TinyDetector(), block)
    message = str(error.value)
    assert "backbone.stem.norm.weight" in message
    assert "'backbone'" in message and "'norm'" in message


def test_frozen_parameters_are_left_out_of_every_group():
    model = TinyDetector()
    for parameter in model.backbone["stem"].parameters():
        parameter.requires_grad_(False)
    groups = param_groups_from_config(model, optimizer_block())
    names = [name for group in groups for name in group.names]
    assert not any(name.startswith("backbone.stem") for name in names)
    assert "backbone.stage1.conv.weight" in names


def test_parameters_of_a_wrapped_model_are_matched_by_their_unwrapped_names():
    groups = param_groups_from_config(
        nn.DataParallel(TinyDetector()), optimizer_block(params=[{"params": "^enc"}])
    )
    assert groups[0].names == [
        "encoder.proj.weight",
        "encoder.proj.bias",
        "encoder.norm.weight",
        "encoder.norm.bias",
    ]


@pytest.mark.parametrize(("name", "expected"), [("Adam", torch.optim.Adam), ("SGD", torch.optim.SGD)])
def test_adam_and_sgd_are_available(name, expected):
    block = {"type": name, "lr": 0.01} | ({"momentum": 0.9} if name == "SGD" else {})
    assert isinstance(build_optimizer(TinyDetector(), block), expected)


def test_unknown_optimizer_type_and_misspelt_setting_give_helpful_errors():
    with pytest.raises(ConfigError, match="AdamW"):
        build_optimizer(TinyDetector(), optimizer_block(type="AdamV"))
    with pytest.raises(ConfigError, match="weight_decay"):
        build_optimizer(TinyDetector(), optimizer_block(weight_decy=0.1))
    with pytest.raises(ConfigError, match="bad regex"):
        param_groups_from_config(TinyDetector(), optimizer_block(params=[{"params": "(unclosed"}]))


def test_optimizer_types_and_settings_are_looked_up_in_the_optimizers_registry():
    assert OPTIMIZERS.names == ["Adam", "AdamW", "SGD"] and OPTIMIZERS.get("AdamW") is torch.optim.AdamW
    with pytest.raises(ConfigError, match=r"optimizer\.lrr is not an argument of AdamW\. Did you mean 'lr'"):
        build_optimizer(TinyDetector(), optimizer_block(lrr=0.1))
    with pytest.raises(ConfigError, match=r"optimizer\.params\[1\]\.weight_decy is not a setting of AdamW"):
        build_optimizer(
            TinyDetector(), optimizer_block(params=[{"params": "^enc"}, {"params": "^dec", "weight_decy": 0}])
        )


def test_an_error_inside_the_optimizer_constructor_is_not_disguised_as_a_config_error():
    with pytest.raises(ValueError, match="Invalid learning rate") as error:
        build_optimizer(TinyDetector(), optimizer_block(lr=-1.0))
    assert not isinstance(error.value, ConfigError)


def test_group_summary_lists_each_group_with_its_size_and_lr():
    model = TinyDetector()
    groups = param_groups_from_config(model, optimizer_block())
    text = group_summary(groups, build_optimizer(model, optimizer_block(), groups))
    lines = text.splitlines()
    assert len(lines) == 3
    assert "4 tensors" in lines[0] and "lr=1e-05" in lines[0]
    assert "<default>" in lines[2] and "lr=0.00025" in lines[2]


def d_fine_config():
    return {
        "optimizer": optimizer_block(),
        "ema": {"type": "ModelEMA", "decay": 0.9999, "warmups": 1000, "start": 0},
        "lr_warmup_scheduler": {"type": "LinearWarmup", "warmup_duration": 2000},
        "train_dataloader": {"total_batch_size": 32, "collate_fn": {"ema_restart_decay": 0.9999}},
    }


def test_doubling_the_batch_doubles_lrs_and_halves_warmups_as_the_original_readme():
    config = d_fine_config()
    original = copy.deepcopy(config)
    scaled, changes = scale_for_batch_size(config, total_batch_size=64, reference_batch_size=32)
    assert config == original  # input untouched
    assert scaled["optimizer"]["lr"] == pytest.approx(5e-4)
    assert scaled["optimizer"]["params"][0]["lr"] == pytest.approx(2e-5)
    assert "lr" not in scaled["optimizer"]["params"][1]
    assert scaled["ema"]["warmups"] == 500
    assert scaled["ema"]["start"] == 0
    assert scaled["lr_warmup_scheduler"]["warmup_duration"] == 1000
    assert scaled["ema"]["decay"] == pytest.approx(0.9998)
    assert scaled["train_dataloader"]["collate_fn"]["ema_restart_decay"] == pytest.approx(0.9998)
    assert any(line.startswith("optimizer.lr: 0.00025 -> 0.0005") for line in changes)
    assert any(line.startswith("optimizer.params[0].lr") for line in changes)
    assert len(changes) == 6


def test_halving_the_batch_halves_lrs_and_doubles_warmups():
    scaled, _ = scale_for_batch_size(d_fine_config(), total_batch_size=16, reference_batch_size=32)
    assert scaled["optimizer"]["lr"] == pytest.approx(1.25e-4)
    assert scaled["ema"]["warmups"] == 2000
    assert scaled["lr_warmup_scheduler"]["warmup_duration"] == 4000


def test_equal_batch_sizes_change_nothing():
    scaled, changes = scale_for_batch_size(d_fine_config(), 32, 32)
    assert scaled == d_fine_config() and changes == []


def test_the_ema_restart_decay_is_scaled_in_its_new_home_and_a_config_comes_back_as_plain_dicts():
    config = Config(d_fine_config() | {"ema": {"type": "ModelEMA", "decay": 0.9999, "restart_decay": 0.9999}})
    scaled, changes = scale_for_batch_size(config, total_batch_size=64, reference_batch_size=32)
    assert scaled["ema"]["restart_decay"] == pytest.approx(0.9998)
    assert any(line.startswith("ema.restart_decay: 0.9999 -> 0.9998") for line in changes)
    assert type(scaled) is dict and type(scaled["ema"]) is dict
