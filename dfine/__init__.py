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

# Importing the layers registers their components by name: models, losses, datasets, transforms, the
# evaluator, and the engine's optimizers, lr schedules, EMA and grad scaler. Config validation looks every
# block's type up when a config is loaded, so all of them must be registered by then.
from dfine import data, losses, models  # noqa: F401
from dfine.config import Config, ConfigError, build_criterion, build_model, build_postprocessor, load_config
from dfine.engine import ema, optim, precision, schedules  # noqa: F401
from dfine.evaluation import coco_evaluator  # noqa: F401
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
