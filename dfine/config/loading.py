"""YAML experiment configs: ``__include__`` composition, deep merge, ``-u a.b=value`` overrides, dumps.

Rules:
    * ``__include__: [paths]`` are relative to the including file; they merge in order, then the including
      file's own keys merge on top (later wins).
    * Mappings merge key by key; every other value (lists included) is replaced whole.
    * Overrides (``-u a.b.c=value``, the value parsed as YAML) are applied last.

:func:`load_config` returns a :class:`Config`, a plain ``dict`` that also remembers which file (or override)
set each key, so that validation errors can say where a bad value came from.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from dfine.config.registry import ConfigError
from dfine.config.schema import validate_config

__all__ = ["Config", "dump_config", "load_config", "parse_override", "plain"]

logger = logging.getLogger(__name__)

INCLUDE_KEY = "__include__"
OVERRIDE_SOURCE = "command line (-u)"


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats such as ``1e-4`` and ``1e18``.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``): ``lr: 1e-4`` would reach the optimizer
    as the string ``'1e-4'``. Everything else resolves as in ``yaml.safe_load``.
    """


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(stream: Any) -> Any:
    return yaml.load(stream, Loader=_ConfigLoader)  # a SafeLoader subclass: no arbitrary objects


class Config(dict):
    """A resolved config: a plain nested dict plus ``sources``, dotted key path -> file that set it."""

    def __init__(
        self, data: Mapping[str, Any] | None = None, sources: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(data or {})
        self.sources: dict[str, str] = dict(sources or {})

    def where(self, path: str) -> str:
        """``file: key.path`` for messages; walks up to the closest key whose source is known."""
        probe = path
        while probe:
            if probe in self.sources:
                return f"{self.sources[probe]}: {path}"
            probe = probe.rpartition(".")[0]
        return path

    def to_dict(self) -> dict[str, Any]:
        """A deep copy as plain dicts and lists (for YAML dumps and checkpoints)."""
        return plain(self)


def plain(value: Any) -> Any:
    """A deep copy of ``value`` as plain dicts and lists (for YAML dumps, checkpoints and edited copies).

    Mappings (a :class:`Config` included) become ``dict`` with string keys, tuples become lists.
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return copy.deepcopy(value)


def _record(sources: dict[str, str], prefix: str, value: Any, source: str) -> None:
    """Mark ``prefix`` and every key below it as set by ``source``."""
    for key in [k for k in sources if k == prefix or k.startswith(prefix + ".")]:
        del sources[key]
    sources[prefix] = source
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _record(sources, f"{prefix}.{key}", sub, source)


def _merge(
    base: dict[str, Any],
    update: Mapping[str, Any],
    sources: dict[str, str],
    update_sources: Mapping[str, str],
    prefix: str = "",
) -> None:
    """Deep-merge ``update`` into ``base``; replaced keys take their sources from ``update_sources``."""
    for key, value in update.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value, sources, update_sources, path)
            continue
        base[key] = copy.deepcopy(value)
        for old in [k for k in sources if k == path or k.startswith(path + ".")]:
            del sources[old]
        sources.update({k: v for k, v in update_sources.items() if k == path or k.startswith(path + ".")})


def _read_yaml(path: Path, included_from: str | None) -> dict[str, Any]:
    if not path.is_file():
        origin = f" (included from {included_from})" if included_from else ""
        raise ConfigError(
            f"config file not found: {path}{origin}. "
            "Check the path; includes are relative to the including file."
        )
    if path.suffix not in (".yml", ".yaml"):
        raise ConfigError(f"{path}: config files must be YAML (.yml or .yaml).")
    try:
        with path.open() as handle:
            data = _load_yaml(handle)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}.")
    return data


def _load_file(
    path: Path, stack: tuple[Path, ...], included_from: str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Load ``path`` and its includes; returns the merged data and its key path -> file map."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"circular __include__: {chain}")
    data = _read_yaml(path, included_from)
    includes = data.pop(INCLUDE_KEY, None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(p, str) for p in includes):
        raise ConfigError(f"{path}: {INCLUDE_KEY} must be a list of relative paths, got {includes!r}.")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for include in includes:
        include_path = Path(include).expanduser()
        if not include_path.is_absolute():
            include_path = path.parent / include_path
        included, included_sources = _load_file(include_path, (*stack, path), str(path))
        _merge(merged, included, sources, included_sources)
    own_sources: dict[str, str] = {}
    for key, value in data.items():
        _record(own_sources, str(key), value, str(path))
    _merge(merged, data, sources, own_sources)
    return merged, sources


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into ``(["a", "b", "c"], parsed value)``; the value is parsed as YAML.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override '{text}' must look like key.sub=value, "
            "e.g. -u epochs=72 or -u model.decoder.num_layers=4"
        )
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML: {error}") from error
    return key.split("."), value


def _apply_override(
    cfg: dict[str, Any], keys: list[str], value: Any, sources: dict[str, str], text: str
) -> None:
    node = cfg
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            path = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"override '{text}': {path} is {child!r}, not a mapping, "
                f"so it has no key '{keys[depth + 1]}'."
            )
        node = child
    node[keys[-1]] = value
    _record(sources, ".".join(keys), value, f"{OVERRIDE_SOURCE} {text}")


def load_config(path: str | Path, overrides: Iterable[str] = (), validate: bool = True) -> Config:
    """Load a YAML config with its includes and overrides, and validate it.

    Args:
        path: the experiment's YAML file.
        overrides: ``key.sub=value`` strings (``-u`` on the command line), applied last.
        validate: check top-level keys, value types and every registered ``type`` block.

    Returns:
        The resolved :class:`Config`.

    Raises:
        ConfigError: a missing file, bad YAML, a bad override, or a validation error naming file and key path.
    """
    data, sources = _load_file(Path(path), (), None)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, sources, text)
    cfg = Config(data, sources)
    cfg.sources.setdefault("", str(Path(path).resolve()))
    if validate:
        validate_config(cfg)
    return cfg


def dump_config(cfg: Mapping[str, Any], path: str | Path | None = None) -> str:
    """The config as YAML text; also written to ``path`` when given."""
    text = yaml.safe_dump(plain(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text
