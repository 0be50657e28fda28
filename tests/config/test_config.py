"""YAML composition, overrides and the errors a user sees for a bad config."""

from __future__ import annotations

from pathlib import Path

import pytest

import dfine
from dfine.config import Config, dump_config, load_config, parse_override
from dfine.config.registry import MODELS, ConfigError, Registry


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


def test_registry_rejects_a_duplicate_name_naming_the_owner() -> None:
    registry = Registry("thing")

    @registry.register()
    class Widget:
        pass

    with pytest.raises(KeyError, match=r"already registered in the thing registry by .*test_config"):
        registry.register("Widget")(type("Other", (), {}))


def test_registry_build_passes_block_and_builder_values() -> None:
    registry = Registry("thing")

    @registry.register()
    class Box:
        def __init__(self, width: int = 1, num_classes: int = 0) -> None:
            self.width, self.num_classes = width, num_classes

    built = registry.build({"type": "Box", "width": 5}, "cfg: box", num_classes=3)
    assert (built.width, built.num_classes) == (5, 3)
    with pytest.raises(ConfigError, match="set once at the top level"):
        registry.build({"type": "Box", "num_classes": 4}, "cfg: box", num_classes=3)


def test_dumped_config_loads_back_equal(layered: Path, tmp_path: Path) -> None:
    cfg = load_config(layered, validate=False)
    out = tmp_path / "resolved.yml"
    dump_config(cfg, out)
    assert load_config(out, validate=False) == cfg


def test_public_api_is_exported() -> None:
    assert callable(dfine.load_config) and callable(dfine.build_model)
    assert callable(dfine.build_criterion) and callable(dfine.build_postprocessor)
    assert "DFINE" in MODELS
    assert isinstance(Config({"a": 1}), dict)
