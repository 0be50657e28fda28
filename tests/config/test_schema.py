"""What validation rejects when a config is loaded: top-level keys and types, and every registered block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dfine.config import load_config
from dfine.config.registry import ConfigError
from dfine.config.schema import BLOCKS, block_spec

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def nested(path: str, value: Any) -> dict[str, Any]:
    """``"a.b.c", 1`` -> ``{"a": {"b": {"c": 1}}}``."""
    for key in reversed(path.split(".")):
        value = {key: value}
    return value


def test_unknown_top_level_key_suggests_the_closest(tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yml", "epoch: 3\n")
    with pytest.raises(
        ConfigError, match=r"exp\.yml: epoch is not a known setting\. Did you mean 'epochs'\?"
    ):
        load_config(exp)


def test_wrong_value_type_names_the_key_and_shows_a_valid_value(tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yml", "epochs: ten\n")
    with pytest.raises(ConfigError, match=r"exp\.yml: epochs must be an integer, got 'ten'.*-u epochs=72"):
        load_config(exp)


def test_bool_is_not_accepted_where_a_number_is_expected(tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yml", "clip_max_norm: true\n")
    with pytest.raises(ConfigError, match="clip_max_norm must be"):
        load_config(exp)


def test_unknown_model_type_lists_registered_names(tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yml", "model: {type: DFNE}\n")
    with pytest.raises(
        ConfigError, match=r"exp\.yml: model: unknown model type 'DFNE'\. Did you mean 'DFINE'\?"
    ):
        load_config(exp)


def test_unknown_argument_names_file_key_path_and_suggestion(tmp_path: Path) -> None:
    base = write(
        tmp_path / "inc" / "model.yml", "model:\n  type: DFINE\n  decoder: {type: DFINETransformer}\n"
    )
    exp = write(tmp_path / "exp.yml", f"__include__: [{base}]\nmodel:\n  decoder:\n    num_querys: 10\n")
    with pytest.raises(ConfigError) as error:
        load_config(exp)
    message = str(error.value)
    assert "exp.yml: model.decoder.num_querys is not an argument of DFINETransformer" in message
    assert "Did you mean 'num_queries' (default 300)?" in message


PROVIDED = [(spec.path, name) for spec in BLOCKS if "*" not in spec.path for name in spec.provided]


def test_the_table_lists_what_the_builders_hand_over() -> None:
    assert ("model.decoder", "num_classes") in PROVIDED and ("ema", "model") in PROVIDED
    provided = {"num_classes", "eval_spatial_size", "use_focal_loss", "remap_mscoco_category", "model"}
    assert {*provided, "device", "coco_gt"} == {
        name for _, name in PROVIDED
    }  # + the scaler's, the evaluator's
    assert block_spec("criterion").nested == ("matcher",)
    assert block_spec("model").nested == ("backbone", "encoder", "decoder")


@pytest.mark.parametrize(("path", "name"), PROVIDED)
def test_every_value_the_builder_provides_fails_at_load_when_set_inside_its_block(
    tmp_path: Path, path: str, name: str
) -> None:
    exp = write(
        tmp_path / "exp.yml",
        yaml.safe_dump({"__include__": [str(QUICKSTART)], **nested(f"{path}.{name}", 3)}),
    )
    with pytest.raises(ConfigError, match="set once at the top level") as error:
        load_config(exp)
    assert f"exp.yml: {path}.{name}" in str(error.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lrr=1", r"optimizer\.lrr is not an argument of AdamW\. Did you mean 'lr'"),
        ("optimizer.type=AdamV", r"unknown optimizer type 'AdamV'\..*optimizer types: Adam, AdamW, SGD"),
        ("lr_scheduler.milestone=[1]", r"lr_scheduler\.milestone is not an argument of MultiStepLR"),
        (
            "lr_scheduler.type=LinearWarmup",
            r"unknown lr scheduler type.*FlatCosineLR, FlatCosineLRScheduler, MultiStepLR",
        ),
        ("lr_warmup_scheduler.warmup_duratoin=3", r"Did you mean 'warmup_duration'"),
        ("ema.type=EMA", r"unknown ema type 'EMA'\..*Registered ema types: ModelEMA"),
        ("ema.decai=0.9", r"ema\.decai is not an argument of ModelEMA\. Did you mean 'decay'"),
        ("model.backbone={type: HGNetv2}", r"model\.backbone\.name is missing: HGNetv2"),
    ],
)
def test_engine_blocks_and_missing_arguments_fail_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(QUICKSTART, [override])


def test_the_shipped_configs_pass_validation() -> None:
    configs = Path(__file__).resolve().parents[2] / "configs"
    for path in [configs / "quickstart.yml", *sorted((configs / "dfine").glob("*.yml"))]:
        load_config(path)
