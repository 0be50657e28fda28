"""The package's layering (DESIGN.md "Layers"): imports point downward only, and modules stay one idea each.

Read from the source text with ``ast``, so a forbidden import fails here even on a path no other test runs
(an import inside a function, for example).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dfine"

# Layer -> subpackages and modules of dfine it must never import.
FORBIDDEN = {
    "ops": ("engine", "cli", "evaluation", "inference", "deploy", "hf", "models", "losses", "data"),
    "models": ("engine", "cli", "evaluation", "inference", "deploy", "hf", "losses", "data"),
    "losses": ("engine", "cli", "evaluation", "inference", "deploy", "hf", "data"),
    "data": ("engine", "cli", "evaluation", "inference", "deploy", "hf"),
    "config": ("engine", "cli", "evaluation", "inference", "deploy", "hf", "models", "losses", "data"),
    "evaluation": ("engine", "cli", "inference", "deploy", "hf"),
    "inference": ("engine", "cli", "deploy", "hf"),
    "deploy": ("engine", "cli", "hf"),
    "hf": ("engine", "cli", "deploy"),
    "engine": ("cli",),
}
MAX_LINES = 500
MAX_TRAINER_LINES = 300


def _modules_of(layer: str) -> list[Path]:
    path = PACKAGE / layer
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _imported_dfine_modules(path: Path, source: str | None = None) -> list[str]:
    """Absolute names of the dfine modules ``path`` (or ``source`` read as that file) imports.

    Relative imports are resolved against the file's package (for ``__init__.py``, the package itself).
    """
    package = ["dfine", *path.relative_to(PACKAGE).parent.parts]
    names = []
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.extend([base] + [f"{base}.{alias.name}" for alias in node.names])
    return [name for name in names if name == "dfine" or name.startswith("dfine.")]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_from_the_layers_above_it(layer: str) -> None:
    offences = []
    for path in _modules_of(layer):
        for name in _imported_dfine_modules(path):
            parts = name.split(".")
            if len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                offences.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert offences == [], "\n".join(offences)


def test_the_import_reader_sees_relative_and_function_level_imports() -> None:
    source = "def f():\n    from ..engine import trainer\n    import dfine.cli.train\n"
    found = _imported_dfine_modules(PACKAGE / "data" / "coco.py", source)
    assert "dfine.engine.trainer" in found and "dfine.cli.train" in found


def test_no_module_is_longer_than_500_lines_and_the_trainer_fits_in_300() -> None:
    lengths = {path: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    too_long = [f"{p.relative_to(PACKAGE.parent)} ({n})" for p, n in lengths.items() if n > MAX_LINES]
    assert too_long == [], f"split these modules (one idea each): {too_long}"
    assert lengths[PACKAGE / "engine" / "trainer.py"] <= MAX_TRAINER_LINES


def test_no_loose_top_level_modules_beyond_the_shared_ones() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "checkpoint.py", "distributed.py"]
