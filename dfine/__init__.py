"""dfine: train, evaluate and ship D-FINE real-time object detectors.

Public API::

    cfg = dfine.load_config("configs/dfine/dfine_hgnetv2_n_coco.yml", overrides=["epochs=12"])
    model = dfine.build_model(cfg)
    criterion = dfine.build_criterion(cfg)
    postprocessor = dfine.build_postprocessor(cfg)
"""

# Importing the layers registers their components (models, losses, datasets, transforms) by name.
from . import data, losses, models  # noqa: F401
from .builder import build_criterion, build_model, build_postprocessor
from .config import Config, ConfigError, load_config

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "build_criterion", "build_model", "build_postprocessor", "load_config"]
