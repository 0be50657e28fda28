"""Experiment configs: YAML loading (``__include__``, merge, ``-u``), the schema, the registry, the builders.

- `loading`: :func:`load_config`, :class:`Config` (a dict that remembers which file set each key), dumps;
- `schema`: the known top-level settings and ``BLOCKS``, where registered blocks sit and what their builders
  hand over; :func:`validate_config`;
- `registry`: name -> class tables (``MODELS``, ``LOSSES``, ``OPTIMIZERS``, ...) and the one ``{type: ...}``
  block builder;
- `build`: :func:`build_model`, :func:`build_criterion`, :func:`build_postprocessor`, ``build_block``;
- `stage_two`: :func:`resolve_stage_two`, D-FINE's stage-2 epoch and EMA restart decay from every place the
  original configs write them.
"""

from __future__ import annotations

from dfine.config.build import build_criterion, build_model, build_postprocessor
from dfine.config.loading import Config, dump_config, load_config, parse_override
from dfine.config.registry import ConfigError
from dfine.config.schema import validate_config
from dfine.config.stage_two import StageTwo, resolve_stage_two

__all__ = [
    "Config",
    "ConfigError",
    "StageTwo",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "dump_config",
    "load_config",
    "parse_override",
    "resolve_stage_two",
    "validate_config",
]
