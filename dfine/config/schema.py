"""What a config may hold: the top-level settings with their types, where registered blocks sit, and checks.

:func:`validate_config` runs when a config is loaded, so a misspelt key or a wrong type fails before anything
is built, naming the file that set it, the dotted key path and a fix. :data:`BLOCKS` is also the table the
builders read (``dfine.config.build.build_block``): what a block receives from its builder is written once,
here, so validation rejects exactly what building would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dfine.config.registry import (
    COLLATORS,
    DATASETS,
    EMAS,
    EVALUATORS,
    LOSSES,
    LR_SCHEDULERS,
    LR_WARMUPS,
    MODELS,
    OPTIMIZERS,
    SCALERS,
    TRANSFORMS,
    ConfigError,
    Registry,
    did_you_mean,
)
from dfine.config.stage_two import check_stage_two

if TYPE_CHECKING:  # loading imports this module to validate what it loads
    from dfine.config.loading import Config

__all__ = ["BLOCKS", "TOP_LEVEL", "BlockSpec", "block_spec", "validate_config"]

logger = logging.getLogger(__name__)


_INT, _FLOAT, _BOOL, _STR = (int,), (int, float), (bool,), (str,)
_MAP, _LIST = (dict,), (list, tuple)

# Top-level keys: allowed types and an example shown when the type is wrong. Names follow the original
# D-FINE configs so experiments carry over.
TOP_LEVEL: dict[str, tuple[tuple[type, ...], str]] = {
    "task": (_STR, "detection"),
    "num_classes": (_INT, "80"),
    "remap_mscoco_category": (_BOOL, "true"),
    "eval_spatial_size": (_LIST, "[640, 640]"),
    "use_focal_loss": (_BOOL, "true"),
    "model": (_MAP, "{type: DFINE, backbone: {...}, encoder: {...}, decoder: {...}}"),
    "criterion": (_MAP, "{type: DFINECriterion, ...}"),
    "postprocessor": (_MAP, "{type: DFINEPostProcessor, num_top_queries: 300}"),
    "epochs": (_INT, "72"),
    "output_dir": (_STR, "./output/run"),
    "seed": (_INT, "0"),
    "device": (_STR, "cuda"),
    "use_amp": (_BOOL, "true"),
    "amp_dtype": (_STR, "bfloat16"),
    "use_ema": (_BOOL, "true"),
    "ema": (_MAP, "{type: ModelEMA, decay: 0.9999, warmups: 1000, start: 0, restart_decay: 0.9999}"),
    "scaler": (_MAP, "{type: GradScaler, enabled: true}"),
    "optimizer": (_MAP, "{type: AdamW, lr: 0.0002, params: [...]}"),
    "lr_scheduler": (_MAP, "{type: MultiStepLR, milestones: [500], gamma: 0.1}"),
    "lr_warmup_scheduler": (_MAP, "{type: LinearWarmup, warmup_duration: 500}"),
    # DEIM's schedule as its configs write it (dfine.engine.schedules.lr_blocks turns it into a block)
    "lrsheduler": (_STR, "flatcosine"),
    "lr_gamma": (_FLOAT, "0.5"),
    "warmup_iter": (_INT, "2000"),
    "flat_epoch": (_INT, "29"),
    "no_aug_epoch": (_INT, "8"),
    "clip_max_norm": (_FLOAT, "0.1"),
    "checkpoint_freq": (_INT, "12"),
    "print_freq": (_INT, "100"),
    "eval_interval": (_INT, "1"),
    "grad_accum_steps": (_INT, "1"),
    "tune_class_map": (_STR, "by_name"),
    "reference_batch_size": (_INT, "32"),
    "freeze": (_LIST, "['^backbone\\.stem']"),
    "patience": (_INT, "10"),
    "sync_bn": (_BOOL, "true"),
    "channels_last": (_BOOL, "true"),
    "cudnn_benchmark": (_BOOL, "true"),
    "compile": (_BOOL, "false"),
    "find_unused_parameters": (_BOOL, "false"),
    "evaluator": (_MAP, "{type: CocoEvaluator, iou_types: [bbox]}"),
    "train_dataloader": (_MAP, "{dataset: {...}, total_batch_size: 32}"),
    "val_dataloader": (_MAP, "{dataset: {...}, total_batch_size: 64}"),
    "summary_dir": (_STR, "./output/run/summary"),
    "loggers": (_LIST, "[tensorboard, mlflow, wandb]"),
}
# Accepted for compatibility with the original configs; they do nothing here.
IGNORED_TOP_LEVEL = frozenset({"use_wandb", "project_name", "exp_name"})


@dataclass(frozen=True)
class BlockSpec:
    """Where a registered ``{type: ...}`` block sits and what its builder hands over.

    Attributes:
        path: dotted key path of the block ("*" matches one list index).
        registry: the registry its ``type`` names.
        provided: arguments the builder passes from elsewhere (top-level settings such as ``num_classes``, or
            the model for the EMA); the block must not set them.
        nested: keys of the block the builder turns into arguments itself (sub-blocks it builds first, the
            optimizer's param groups); the builder fills or reports them when they are absent.
    """

    path: str
    registry: Registry
    provided: tuple[str, ...] = ()
    nested: tuple[str, ...] = ()


# Every registered block of a config. The builders (dfine.config.build, the engine's optimizer, schedules and
# EMA) go through build_block, which checks that they pass exactly `provided` and `nested`; dfine.data.loader
# passes the datasets' num_classes itself. Validation reads the same table, so it rejects what building would.
BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec("model", MODELS, nested=("backbone", "encoder", "decoder")),
    BlockSpec("model.backbone", MODELS),
    BlockSpec("model.encoder", MODELS, provided=("eval_spatial_size",)),
    BlockSpec("model.decoder", MODELS, provided=("num_classes", "eval_spatial_size")),
    BlockSpec("postprocessor", MODELS, provided=("num_classes", "use_focal_loss", "remap_mscoco_category")),
    BlockSpec("criterion", LOSSES, provided=("num_classes",), nested=("matcher",)),
    BlockSpec("criterion.matcher", LOSSES, provided=("use_focal_loss",)),
    BlockSpec("train_dataloader.dataset", DATASETS, provided=("num_classes",), nested=("transforms",)),
    BlockSpec("val_dataloader.dataset", DATASETS, provided=("num_classes",), nested=("transforms",)),
    BlockSpec("train_dataloader.dataset.transforms", TRANSFORMS, nested=("ops",)),
    BlockSpec("val_dataloader.dataset.transforms", TRANSFORMS, nested=("ops",)),
    BlockSpec("train_dataloader.dataset.transforms.ops.*", TRANSFORMS),
    BlockSpec("val_dataloader.dataset.transforms.ops.*", TRANSFORMS),
    BlockSpec("train_dataloader.collate_fn", COLLATORS),
    BlockSpec("val_dataloader.collate_fn", COLLATORS),
    BlockSpec("optimizer", OPTIMIZERS, nested=("params",)),
    BlockSpec("lr_scheduler", LR_SCHEDULERS),
    BlockSpec("lr_warmup_scheduler", LR_WARMUPS),
    BlockSpec("ema", EMAS, provided=("model",)),
    BlockSpec("scaler", SCALERS, provided=("device",)),
    BlockSpec("evaluator", EVALUATORS, provided=("coco_gt",)),
)
_BY_PATH = {spec.path: spec for spec in BLOCKS}


def block_spec(path: str) -> BlockSpec:
    """The :data:`BLOCKS` entry of ``path`` (e.g. ``"model.decoder"``).

    Raises:
        KeyError: ``path`` is not a registered block's path.
    """
    if path not in _BY_PATH:
        raise KeyError(f"no registered block sits at '{path}'; known: {', '.join(_BY_PATH)}")
    return _BY_PATH[path]


def _type_name(types: Sequence[type]) -> str:
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        dict: "a mapping",
        list: "a list",
        tuple: "a list",
    }
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _check_type(cfg: Config, key: str, value: Any, types: tuple[type, ...], example: str) -> None:
    if value is None:
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(
            f"{cfg.where(key)} must be {_type_name(types)}, got {value!r} ({type(value).__name__}); "
            f"e.g. -u {key}={example}"
        )


def _lookup(cfg: Mapping[str, Any], pattern: str) -> list[tuple[str, Any]]:
    """All (path, value) pairs matching a dotted pattern where '*' matches list indices."""
    found: list[tuple[str, Any]] = [("", cfg)]
    for part in pattern.split("."):
        nxt: list[tuple[str, Any]] = []
        for path, node in found:
            if part == "*" and isinstance(node, list):
                nxt.extend((f"{path}.{i}", item) for i, item in enumerate(node))
            elif isinstance(node, Mapping) and part in node:
                nxt.append((f"{path}.{part}" if path else part, node[part]))
        found = nxt
    return found


def validate_config(cfg: Config) -> None:
    """Check top-level keys and types, every registered block's ``type`` and arguments, and stage 2.

    Raises:
        ConfigError: naming the file that set the bad key, the key path and a fix.
    """
    for key, value in cfg.items():
        if key in IGNORED_TOP_LEVEL:
            logger.info("%s is ignored by dfine (accepted for compatibility with the original configs)", key)
            continue
        if key not in TOP_LEVEL:
            hint = did_you_mean(key, TOP_LEVEL)
            raise ConfigError(
                f"{cfg.where(key)} is not a known setting.{hint} "
                f"Known settings: {', '.join(sorted(TOP_LEVEL))}."
            )
        _check_type(cfg, key, value, *TOP_LEVEL[key])
    size = cfg.get("eval_spatial_size")
    if size is not None and (len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size)):
        raise ConfigError(
            f"{cfg.where('eval_spatial_size')} must be [height, width] in pixels, got {size!r}."
        )
    num_classes = cfg.get("num_classes")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(
            f"{cfg.where('num_classes')} must be >= 1 (the number of object classes), got {num_classes}."
        )
    for spec in BLOCKS:
        for path, block in _lookup(cfg, spec.path):
            if block is None:
                continue
            if not isinstance(block, Mapping) or "type" not in block:
                raise ConfigError(f"{cfg.where(path)} must be a mapping with a 'type' key, got {block!r}.")
            locate = lambda key, path=path: cfg.where(f"{path}.{key}")  # noqa: E731
            spec.registry.check_block(
                block, cfg.where(path), provided=spec.provided, locate=locate, nested=spec.nested
            )
    check_stage_two(cfg)
