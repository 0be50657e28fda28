"""The registry: registration, the one ``{type: ...}`` builder, and which errors are config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfine.config.registry import ConfigError, Registry


def test_registry_rejects_a_duplicate_name_naming_the_owner() -> None:
    registry = Registry("thing")

    @registry.register()
    class Widget:
        pass

    with pytest.raises(KeyError, match=r"already registered in the thing registry by .*test_registry"):
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


@pytest.fixture()
def things() -> Registry:
    registry = Registry("thing")

    @registry.register()
    class Broken:
        def __init__(self, width: int = 1) -> None:
            raise ValueError(f"a bug inside the constructor (width={width})")

    @registry.register()
    class Needy:
        def __init__(self, weight_dict: dict, width: int = 1) -> None:
            self.weight_dict, self.width = weight_dict, width

    @registry.register()
    class Picky:
        def __init__(self, fmt: str = "xyxy") -> None:
            if fmt not in ("xyxy", "cxcywh"):
                raise ConfigError(f"Picky fmt must be xyxy or cxcywh, got {fmt!r}")

    return registry


def test_an_error_raised_inside_a_constructor_propagates_unchanged_with_its_traceback(things) -> None:
    with pytest.raises(ValueError, match=r"a bug inside the constructor \(width=2\)") as error:
        things.build({"type": "Broken", "width": 2}, "cfg.yml: thing")
    assert type(error.value) is ValueError  # not turned into a ConfigError
    frames = [(Path(str(entry.path)).name, entry.name) for entry in error.traceback]
    assert ("test_registry.py", "__init__") in frames  # the constructor's own frame is kept


def test_a_missing_required_argument_names_the_block_and_the_argument(things) -> None:
    with pytest.raises(ConfigError, match=r"cfg\.yml: criterion\.weight_dict is missing: Needy") as error:
        things.build({"type": "Needy", "width": 2}, "cfg.yml: criterion")
    assert "'weight_dict'" in str(error.value)
    with pytest.raises(ConfigError, match=r"criterion\.weight_dict is missing"):
        things.check_block({"type": "Needy"}, "cfg.yml: criterion")


def test_a_nested_or_provided_argument_is_not_missing(things) -> None:
    things.check_block({"type": "Needy"}, "cfg.yml: criterion", nested=("weight_dict",))
    built = things.build({"type": "Needy"}, "cfg.yml: criterion", weight_dict={"loss": 1})
    assert built.weight_dict == {"loss": 1}


def test_an_unknown_argument_is_a_config_error_with_a_suggestion(things) -> None:
    with pytest.raises(
        ConfigError, match=r"cfg\.yml: thing\.widht is not an argument of Broken\. Did you mean"
    ):
        things.build({"type": "Broken", "widht": 2}, "cfg.yml: thing")


def test_a_config_error_from_the_constructor_says_which_block_it_came_from(things) -> None:
    with pytest.raises(ConfigError, match=r"^cfg\.yml: ops\[2\]: Picky fmt must be") as error:
        things.build({"type": "Picky", "fmt": "xywhn"}, "cfg.yml: ops[2]")
    assert isinstance(error.value.__cause__, ConfigError)  # the constructor's error, traceback and all


def test_an_unknown_type_lists_the_registered_names(things) -> None:
    with pytest.raises(ConfigError, match=r"unknown thing type 'Neddy'\. Did you mean 'Needy'\?.*Broken"):
        things.build({"type": "Neddy"}, "cfg.yml: thing")
