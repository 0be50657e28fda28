"""Experiment configs: YAML loading (``__include__``, merge, ``-u``), the schema, the registry, the builders.

- `loading`: :func:`load_config`, :class:`Config` (a dict that remembers which file set each key), dumps;
- `schema`: the known top-level settings and where registered blocks sit; :func:`validate_config`;
- `registry`: name -> class tables (``MODELS``, ``LOSSES``, ...) and the one ``{type: ...}`` block builder;
- `build`: :func:`build_model`, :func:`build_criterion`, :func:`build_postprocessor`.
"""

from __future__ import annotations

from dfine.config.build import build_criterion, build_model, build_postprocessor
from dfine.config.loading import Config, dump_config, load_config, parse_override
from dfine.config.registry import ConfigError
from dfine.config.schema import validate_config

__all__ = [
    "Config",
    "ConfigError",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "dump_config",
    "load_config",
    "parse_override",
    "validate_config",
]
