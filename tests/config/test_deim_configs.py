"""configs/deim: every size builds DEIM's model layout (parameter counts and state-dict keys of DEIM's own
models), the recipe settings are DEIM's, and the stage-2 epoch resolves from DEIM's three-epoch policy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dfine
from dfine.checkpoint import extract_model_state, load_checkpoint, load_weights_strict
from dfine.config.stage_two import resolve_stage_two

ROOT = Path(__file__).resolve().parents[2]
SIZES = ("n", "s", "m", "l", "x")
# Measured with DEIM's own code (tools/deim_layout.py, re-run live below; YAMLConfig of DEIM's
# configs/deim_dfine/deim_hgnetv2_<size>_coco.yml, HGNetv2={'pretrained': False}): parameters, state-dict
# numel and keys, and the first 16 hex digits of sha256 over the sorted "key:shape" lines of its state dict.
DEIM_LAYOUT = {
    "n": (3_782_693, 3_809_074, 674, "3eb0684605473a9a"),
    "s": (10_321_877, 10_392_158, 794, "98b4089f70ba7a1f"),
    "m": (19_590_064, 19_684_031, 1053, "00a32dacfba18a6a"),
    "l": (31_289_848, 31_406_971, 1253, "4ff6f7054836dec6"),
    "x": (62_715_480, 62_897_008, 1571, "56312ae13f7edec9"),
}
# epochs, policy epochs, flat epochs, no-aug epochs, lr_gamma of DEIM's deim_dfine/deim_hgnetv2_*_coco.yml
DEIM_RECIPE = {
    "n": (160, [4, 78, 148], 7800, 12, 1.0),
    "s": (132, [4, 64, 120], 64, 12, 0.5),
    "m": (102, [4, 49, 90], 49, 12, 0.5),
    "l": (58, [4, 29, 50], 29, 8, 0.5),
    "x": (58, [4, 29, 50], 29, 8, 0.5),
}


def layout(model: nn.Module) -> tuple[int, int, int, str]:
    state = model.state_dict()
    lines = "\n".join(f"{key}:{tuple(state[key].shape)}" for key in sorted(state))
    return (
        sum(p.numel() for p in model.parameters()),
        sum(v.numel() for v in state.values()),
        len(state),
        hashlib.sha256(lines.encode()).hexdigest()[:16],
    )


def build(config: str) -> nn.Module:
    with torch.device("meta"):  # shapes and keys only: no memory, no time
        return dfine.build_model(dfine.load_config(ROOT / config))


@pytest.mark.parametrize("size", SIZES)
def test_layout_equals_deims_and_parameters_equal_dfines(size: str) -> None:
    model = build(f"configs/deim/deim_hgnetv2_{size}_coco.yml")
    assert layout(model) == DEIM_LAYOUT[size]
    # D-FINE's layout: every key of D-FINE's model of that size, same shape; DEIM adds only the step counters
    # of the BatchNorms it unfreezes (L and X; D-FINE's N-M train them already)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {
        k: v.shape for k, v in build(f"configs/dfine/dfine_hgnetv2_{size}_coco.yml").state_dict().items()
    }
    assert {k: ours[k] for k in theirs} == theirs
    assert {k.rpartition(".")[2] for k in set(ours) - set(theirs)} <= {"num_batches_tracked"}
    assert (set(ours) == set(theirs)) is (size in ("n", "s", "m"))


@pytest.mark.parametrize("size", SIZES)
def test_recipe_settings_are_deims(size: str) -> None:
    cfg = dfine.load_config(ROOT / f"configs/deim/deim_hgnetv2_{size}_coco.yml")
    epochs, policy, flat, no_aug, gamma = DEIM_RECIPE[size]
    loader = cfg["train_dataloader"]
    assert cfg["epochs"] == epochs
    assert loader["dataset"]["transforms"]["policy"]["epoch"] == policy
    assert (
        loader["collate_fn"]["mixup_epochs"] == policy[:2] and loader["collate_fn"]["stop_epoch"] == policy[2]
    )
    assert cfg["lr_scheduler"] == {"type": "FlatCosineLRScheduler", "lr_gamma": gamma, "warmup_iter": 2000,
                                   "flat_epochs": flat, "no_aug_epochs": no_aug}  # fmt: skip
    assert cfg.get("lr_warmup_scheduler") is None
    assert cfg["criterion"]["type"] == "DEIMCriterion" and cfg["criterion"]["losses"] == [
        "mal",
        "boxes",
        "local",
    ]
    assert cfg["criterion"]["gamma"] == 1.5
    decoder, backbone = cfg["model"]["decoder"], cfg["model"]["backbone"]
    assert (decoder["activation"], decoder["mlp_act"]) == ("silu", "silu")
    assert (backbone["freeze_at"], backbone["freeze_norm"]) == (-1, False)
    assert resolve_stage_two(cfg).epoch == policy[2]


def test_quickstart_deim_differs_from_the_quickstart_only_in_the_recipe() -> None:
    dfine_cfg = dfine.load_config(ROOT / "configs/quickstart.yml")
    deim_cfg = dfine.load_config(ROOT / "configs/quickstart_deim.yml")
    for key in ("epochs", "eval_spatial_size", "optimizer", "ema", "val_dataloader"):
        assert deim_cfg[key] == dfine_cfg[key], key
    assert (
        deim_cfg["train_dataloader"]["total_batch_size"] == dfine_cfg["train_dataloader"]["total_batch_size"]
    )
    assert resolve_stage_two(deim_cfg).epoch == resolve_stage_two(dfine_cfg).epoch == 4
    assert layout(build("configs/quickstart_deim.yml")) == layout(build("configs/quickstart.yml"))


@pytest.mark.deim
@pytest.mark.parametrize("size", SIZES)
def test_layout_equals_deims_own_model_live(deim: Path, size: str) -> None:
    # DEIM's config system keeps global state between models: one process per size
    command = [sys.executable, str(ROOT / "tools" / "deim_layout.py"), size, "--deim", str(deim)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    ours = layout(build(f"configs/deim/deim_hgnetv2_{size}_coco.yml"))
    assert ours == (theirs["params"], theirs["state_numel"], theirs["num_keys"], theirs["keys_sha"])


@pytest.mark.deim
def test_a_deim_checkpoint_loads_strictly_into_the_deim_config_model(deim: Path, tmp_path: Path) -> None:
    path = tmp_path / "deim_n.pth"
    command = [
        sys.executable,
        str(ROOT / "tools" / "deim_layout.py"),
        "n",
        "--deim",
        str(deim),
        "--save",
        str(path),
    ]
    subprocess.run(command, capture_output=True, text=True, check=True)
    state, _ = extract_model_state(load_checkpoint(path), prefer_ema=True)
    model = dfine.build_model(dfine.load_config(ROOT / "configs/deim/deim_hgnetv2_n_coco.yml"))
    load_weights_strict(model, state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
