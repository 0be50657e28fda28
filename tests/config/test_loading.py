"""YAML composition (``__include__``, merge), ``-u`` overrides, sources, dumps and ``plain``."""

from __future__ import annotations

from pathlib import Path

import pytest

import dfine
from dfine.config import Config, dump_config, load_config, parse_override
from dfine.config.loading import plain
from dfine.config.registry import MODELS, ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture()
def layered(tmp_path: Path) -> Path:
    write(
        tmp_path / "base" / "a.yml",
        "epochs: 1\noutput_dir: from_a\noptimizer: {lr: 0.1, betas: [0.9, 0.999]}\n",
    )
    write(tmp_path / "base" / "b.yml", "epochs: 2\noptimizer: {weight_decay: 0.01, betas: [0.5]}\n")
    return write(
        tmp_path / "exp.yml",
        "__include__: [base/a.yml, base/b.yml]\nepochs: 3\noptimizer: {lr: 0.2}\n",
    )


def test_later_includes_and_the_including_file_win(layered: Path) -> None:
    cfg = load_config(layered, validate=False)
    assert cfg["epochs"] == 3
    assert cfg["output_dir"] == "from_a"


def test_mappings_merge_deeply_and_lists_replace(layered: Path) -> None:
    cfg = load_config(layered, validate=False)
    assert cfg["optimizer"] == {"lr": 0.2, "betas": [0.5], "weight_decay": 0.01}


def test_sources_name_the_file_that_set_each_key(layered: Path) -> None:
    cfg = load_config(layered, validate=False)
    assert cfg.sources["output_dir"].endswith("a.yml")
    assert cfg.sources["optimizer.weight_decay"].endswith("b.yml")
    assert cfg.sources["optimizer.lr"].endswith("exp.yml")
    assert cfg.where("optimizer.betas").startswith(str(layered.parent / "base" / "b.yml"))


def test_overrides_are_parsed_as_yaml_and_applied_last(layered: Path) -> None:
    cfg = load_config(
        layered, ["epochs=7", "optimizer.betas=[0.1, 0.2]", "new_block.flag=true"], validate=False
    )
    assert cfg["epochs"] == 7
    assert cfg["optimizer"]["betas"] == [0.1, 0.2]
    assert cfg["optimizer"]["lr"] == 0.2
    assert cfg["new_block"] == {"flag": True}
    assert "command line" in cfg.sources["epochs"]


def test_exponent_floats_without_a_dot_are_numbers_in_files_and_overrides(tmp_path: Path) -> None:
    # PyYAML alone reads `1e-4` as the string '1e-4', which would reach AdamW as a string.
    path = write(tmp_path / "exp.yml", "optimizer: {lr: 1e-4, eps: -2E+3}\nname: 1e5x\ntag: v1e5\n")
    cfg = load_config(path, ["scaler.init_scale=1e18", "epochs=12"], validate=False)
    assert cfg["optimizer"] == {"lr": 1e-4, "eps": -2000.0}
    assert cfg["scaler"]["init_scale"] == 1e18 and isinstance(cfg["scaler"]["init_scale"], float)
    assert cfg["epochs"] == 12 and isinstance(cfg["epochs"], int)
    assert cfg["name"] == "1e5x" and cfg["tag"] == "v1e5"


def test_override_without_equals_sign_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        parse_override("epochs")


def test_override_through_a_scalar_names_the_path(layered: Path) -> None:
    with pytest.raises(ConfigError, match=r"epochs is 3, not a mapping"):
        load_config(layered, ["epochs.sub=1"], validate=False)


def test_overrides_use_safe_yaml_so_tags_cannot_run_code(layered: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(layered, ["epochs=!!python/object/apply:os.system ['true']"], validate=False)


def test_missing_include_names_the_including_file(tmp_path: Path) -> None:
    exp = write(tmp_path / "exp.yml", "__include__: [nothere.yml]\n")
    with pytest.raises(
        ConfigError, match=r"config file not found: .*nothere\.yml \(included from .*exp\.yml\)"
    ):
        load_config(exp)


def test_circular_include_is_reported(tmp_path: Path) -> None:
    write(tmp_path / "a.yml", "__include__: [b.yml]\n")
    write(tmp_path / "b.yml", "__include__: [a.yml]\n")
    with pytest.raises(ConfigError, match="circular __include__"):
        load_config(tmp_path / "a.yml")


def test_dumped_config_loads_back_equal(layered: Path, tmp_path: Path) -> None:
    cfg = load_config(layered, validate=False)
    out = tmp_path / "resolved.yml"
    dump_config(cfg, out)
    assert load_config(out, validate=False) == cfg


def test_plain_is_a_deep_copy_made_of_dicts_and_lists() -> None:
    inner = {"betas": (0.9, 0.999), "params": [{"lr": 1.0}]}
    cfg = Config({"optimizer": inner}, {"optimizer": "exp.yml"})
    copied = plain(cfg)
    assert type(copied) is dict and copied == {"optimizer": {"betas": [0.9, 0.999], "params": [{"lr": 1.0}]}}
    copied["optimizer"]["params"][0]["lr"] = 2.0
    assert inner["params"][0]["lr"] == 1.0


def test_public_api_is_exported() -> None:
    assert callable(dfine.load_config) and callable(dfine.build_model)
    assert callable(dfine.build_criterion) and callable(dfine.build_postprocessor)
    assert "DFINE" in MODELS
    assert isinstance(Config({"a": 1}), dict)
