"""dfine: train, evaluate and ship D-FINE real-time object detectors.

Public API::

    cfg = dfine.load_config("configs/dfine/dfine_hgnetv2_n_coco.yml", overrides=["epochs=12"])
    model = dfine.build_model(cfg)
    criterion = dfine.build_criterion(cfg)
    postprocessor = dfine.build_postprocessor(cfg)
    predictor = dfine.Predictor(cfg, "output/run/best.pth")   # dfine.inference.predictor

Package layout (imports point downward): cli -> engine -> evaluation / inference / deploy / hf ->
checkpoint, distributed -> data, losses, models -> ops, config.
"""

# Importing the layers registers their components (models, losses, datasets, transforms) by name.
from dfine import data, losses, models  # noqa: F401
from dfine.config import Config, ConfigError, build_criterion, build_model, build_postprocessor, load_config
from dfine.inference.predictor import Predictor

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Predictor",
    "build_criterion",
    "build_model",
    "build_postprocessor",
    "load_config",
]
