"""Build the parts of a training run, in order, from a resolved config: :func:`build_training`.

The order matters and :func:`build_training` shows it top to bottom: process group and seed, batch-size
scaling, data (checked at start-up), model, fine-tuning weights, freezing, DDP, optimizer and lr schedule,
EMA, precision, the training step, and resuming last, since it overwrites what was built before it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfine import distributed as dist_utils
from dfine.checkpoint import class_map_from_names, load_checkpoint, load_weights_for_finetune
from dfine.config import Config, dump_config
from dfine.config.build import build_criterion, build_model, build_postprocessor
from dfine.config.registry import ConfigError
from dfine.config.stage_two import resolve_stage_two
from dfine.engine.acceleration import apply_speed_settings, compile_hot_modules
from dfine.engine.ema import ModelEMA, build_ema
from dfine.engine.optim import build_optimizer, group_summary, param_groups_from_config, scale_for_batch_size
from dfine.engine.precision import build_grad_scaler, choose_precision
from dfine.engine.run_state import RunCheckpoints, RunState, resume_or_refuse, seed_everything
from dfine.engine.schedules import LRSchedule, build_lr_schedule, lr_blocks
from dfine.engine.step import TrainStep
from dfine.evaluation.coco_evaluator import CocoEvaluator, build_evaluator

__all__ = [
    "TrainingRun",
    "build_training",
    "freeze_parameters",
    "scaled_config",
    "wrap_for_distributed",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainingRun:
    """Everything a :class:`~dfine.engine.trainer.Trainer` runs, built by :func:`build_training`.

    ``model`` is the module whose state dict is saved and averaged by the EMA; ``train_model`` is what the
    forward pass runs: its DistributedDataParallel wrapper under torchrun, else ``model`` itself.
    ``stop_epoch`` (``None``: no stage 2) and ``ema_restart_decay`` are D-FINE's two-stage settings;
    ``patience`` 0 means no early stopping, ``checkpoint_freq`` 0 no numbered checkpoints.
    """

    context: dist_utils.DistributedContext
    device: torch.device
    cfg: Config
    seed: int
    output_dir: Path
    train_loader: Any
    val_loader: Any
    model: nn.Module
    train_model: nn.Module
    criterion: nn.Module
    postprocessor: nn.Module
    evaluator: CocoEvaluator
    optimizer: torch.optim.Optimizer
    lr_schedule: LRSchedule
    ema: ModelEMA | None
    step: TrainStep
    state: RunState
    checkpoints: RunCheckpoints
    frozen: list[str]
    class_names: list[str]
    epochs: int
    eval_interval: int = 1
    checkpoint_freq: int = 0
    print_freq: int = 100
    patience: int = 0
    stop_epoch: int | None = None
    ema_restart_decay: float | None = None

    def describe(self) -> str:
        """The resolved schedule, logged once at start-up."""
        batch = (self.cfg.get("train_dataloader") or {}).get("total_batch_size")
        ema = f"decay {self.ema.decay} (warm-up {self.ema.warmups} steps)" if self.ema else "off"
        step = self.step
        parts = [
            f"epochs {self.epochs}",
            f"steps/epoch {self.lr_schedule.steps_per_epoch}",
            f"schedule {self.lr_schedule.describe()}",
            f"stop_epoch {self.stop_epoch}",
            f"EMA {ema}",
            f"effective batch {batch} x {step.grad_accum_steps} accumulation",
            f"AMP {step.amp_dtype if step.use_amp else 'off'}",
            f"device {self.device} x {self.context.world_size}",
        ]
        return "; ".join(parts)


def build_training(
    cfg: Config,
    resume: str | None = None,
    tune: str | None = None,
    class_map: Mapping[int, int] | None = None,
    exist_ok: bool = False,
) -> TrainingRun:
    """Build every part of a training run from a resolved config, in the order the parts depend on.

    Args:
        cfg: the resolved config (:func:`dfine.load_config`).
        resume: checkpoint to resume everything from, ``"auto"`` for ``output_dir/last.pth`` when present.
        tune: checkpoint to take weights from (fine-tuning); optimiser, schedules and epoch start fresh.
        class_map: for ``tune``, ``{new_label: checkpoint_label}`` rows of the class heads to keep.
        exist_ok: a fresh run may start over in an ``output_dir`` that already holds checkpoints (otherwise
            it is refused: :func:`~dfine.engine.run_state.resume_or_refuse`).

    Raises:
        ConfigError: both ``resume`` and ``tune``, a missing or invalid setting, data that cannot be
            trained on, or a weights-only file given to ``resume``.
    """
    if resume and tune:
        raise ConfigError(
            "use either -r/--resume (continue a run) or -t/--tune (start from weights), not both"
        )
    context = dist_utils.init_distributed(cfg.get("device"))
    device = context.device
    output_dir = Path(cfg.get("output_dir") or "./output/run")
    resume = _decide_start(output_dir, resume, exist_ok, context)  # before anything is written there
    if resume == "auto":
        tune = None  # a restarted worker group continues its own run; the tuned weights are in last.pth
    dist_utils.setup_logging(output_dir, context.rank)
    seed = dist_utils.broadcast_object(_seed(cfg))  # one seed for the run; each rank its own stream below
    seed_everything(seed + context.rank)
    cfg = scaled_config(cfg)  # lr, warm-up and EMA follow the batch size before anything reads them
    epochs = int(_require(cfg, "epochs"))
    stage_two = resolve_stage_two(cfg)  # the one reader of the stage-2 epoch and EMA restart decay

    train_loader, val_loader = build_loaders(cfg, context, seed, stage_two.epoch)
    model = build_model(cfg).to(device)
    _check_queries_fit(model, cfg)
    criterion = build_criterion(cfg).to(device)
    postprocessor = build_postprocessor(cfg).to(device)
    # One evaluator for the run: the ground truth is indexed once; its matches also feed the curves.
    evaluator = build_evaluator(
        cfg.get("evaluator"), val_loader.dataset.to_coco_dict(), cfg.where("evaluator")
    )
    # Tuning weights go in before freezing, DDP, the optimizer and the EMA copy: all take the parameters as
    # they are at that moment.
    if tune:
        load_tuning_weights(model, cfg, tune, class_map, train_loader.dataset)
    frozen = freeze_parameters(model, cfg)  # before the optimizer, which only takes trainable parameters
    speed_settings = apply_speed_settings(model, cfg, device)  # memory layout before DDP's buckets
    model, train_model = wrap_for_distributed(model, cfg, context)
    optimizer, lr_schedule = _build_optimization(model, cfg, len(train_loader), epochs)
    ema = build_ema(cfg.get("ema"), model, cfg.where("ema")) if cfg.get("use_ema") else None
    if cfg.get("compile"):  # after the EMA copy, which must stay an ordinary module
        compile_hot_modules(model)
        speed_settings.append("torch.compile(backbone, encoder)")
    if speed_settings:
        logger.info("speed settings: %s", ", ".join(speed_settings))
    state = RunState(seed=seed)
    step = _build_step(  # precision (choose_precision), accumulation, clipping, DDP graph anchors
        cfg, context, output_dir, state, model, train_model, criterion, optimizer, lr_schedule, ema
    )
    label_map = getattr(train_loader.dataset, "label_map", None)
    checkpoints = RunCheckpoints(state, step, cfg, label_map, output_dir, enabled=context.is_main)
    if resume:  # last: it overwrites the weights, optimizer, schedule, scaler and counters built above
        checkpoints.resume(resume)
    if context.is_main:
        dump_config(cfg, output_dir / "config.yml")
    return TrainingRun(
        context=context,
        device=device,
        cfg=cfg,
        seed=seed,
        output_dir=output_dir,
        train_loader=train_loader,
        val_loader=val_loader,
        model=model,
        train_model=train_model,
        criterion=criterion,
        postprocessor=postprocessor,
        evaluator=evaluator,
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        ema=ema,
        step=step,
        state=state,
        checkpoints=checkpoints,
        frozen=frozen,
        class_names=_class_names(cfg, val_loader),
        epochs=epochs,
        eval_interval=int(cfg.get("eval_interval") or 1),
        checkpoint_freq=int(cfg.get("checkpoint_freq") or 0),
        print_freq=max(1, int(cfg.get("print_freq") or 100)),
        patience=int(cfg.get("patience") or 0),
        stop_epoch=stage_two.epoch,
        ema_restart_decay=stage_two.ema_restart_decay,
    )


def _decide_start(
    output_dir: Path, resume: str | None, exist_ok: bool, context: dist_utils.DistributedContext
) -> str | None:
    """Rank 0 decides (it owns the files); every rank gets the same answer or the same error."""
    decision: tuple[str, str | None] = ("ok", None)
    if context.is_main:
        try:
            writable_output_dir(output_dir)
            decision = ("ok", resume_or_refuse(output_dir, resume, exist_ok))
        except ConfigError as error:
            decision = ("error", str(error))
    kind, value = dist_utils.broadcast_object(decision)
    if kind == "error":
        raise ConfigError(value)
    return value


def _check_queries_fit(model: nn.Module, cfg: Config) -> None:
    """The decoder picks ``num_queries`` encoder cells; fewer cells at ``eval_spatial_size`` cannot run."""
    for module in model.modules():
        size, strides = getattr(module, "eval_spatial_size", None), getattr(module, "feat_strides", None)
        queries = getattr(module, "num_queries", None)
        if not (size and strides and queries):
            continue
        cells = sum(int(size[0] / stride) * int(size[1] / stride) for stride in strides)
        if queries > cells:
            raise ConfigError(
                f"{cfg.where('eval_spatial_size')}: {list(size)} gives {cells} encoder cells (strides "
                f"{list(strides)}), fewer than num_queries={queries}; use a larger eval_spatial_size or "
                f"fewer queries, e.g. -u model.decoder.num_queries={cells}"
            )


def writable_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and check that files can be written there (a clear error, not an OSError)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"output_dir {output_dir} is not writable ({error.strerror or error}); choose another folder "
            "with --output-dir or -u output_dir=PATH"
        ) from error


def _require(cfg: Config, key: str) -> Any:
    if cfg.get(key) is None:
        raise ConfigError(f"{cfg.where(key)} is missing: training needs '{key}' at the top level")
    return cfg[key]


def _seed(cfg: Config) -> int:
    return int(cfg["seed"]) if cfg.get("seed") is not None else int(torch.randint(0, 2**31 - 1, ()).item())


def scaled_config(cfg: Config) -> Config:
    """Apply ``reference_batch_size`` scaling (lr, warm-up, EMA) when the user's batch size differs."""
    reference = cfg.get("reference_batch_size")
    total = (cfg.get("train_dataloader") or {}).get("total_batch_size")
    if not reference or not total:
        return cfg
    effective = int(total) * int(cfg.get("grad_accum_steps") or 1)
    scaled, changes = scale_for_batch_size(cfg, effective, int(reference))
    for line in changes:
        logger.info("batch size %d vs reference %d: %s", effective, reference, line)
    return Config(scaled, cfg.sources)


def build_loaders(
    cfg: Config, context: dist_utils.DistributedContext, seed: int, stop_epoch: int | None = None
) -> tuple[Any, Any]:
    """The training and validation loaders of this rank; fails at start-up when image files are missing.

    ``stop_epoch`` (the resolved stage-2 epoch) is handed to a training collate function that does not set
    its own, so multi-scale stops with the augmentation policy however the config wrote the epoch.
    """
    from dfine.data import build_dataloader  # data sits beside engine; imported here to keep start-up light

    common = {
        "world_size": context.world_size,
        "rank": context.rank,
        "seed": seed,
        "num_classes": int(_require(cfg, "num_classes")),
    }
    train_block = dict(_require(cfg, "train_dataloader"))
    collate = train_block.get("collate_fn")
    if stop_epoch is not None and isinstance(collate, Mapping) and collate.get("stop_epoch") is None:
        train_block["collate_fn"] = {**collate, "stop_epoch": stop_epoch}
    train = build_dataloader(train_block, split="train", where=cfg.where("train_dataloader"), **common)
    val_block = _require(cfg, "val_dataloader")
    val = build_dataloader(val_block, split="val", where=cfg.where("val_dataloader"), **common)
    _check_data(context, train.dataset, val.dataset)
    return train, val


def _check_data(context: dist_utils.DistributedContext, *datasets: Any) -> None:
    """Fail at start-up, not hours in, when image files are missing (``--check-data`` looks deeper)."""
    from dfine.data import check_dataset

    problems = []
    if context.is_main:
        for dataset in datasets:
            report = check_dataset(dataset, images="exists")
            for line in report.summary_lines():
                logger.info("data: %s", line)
            if not report.ok:
                problems.extend(report.summary_lines())
    problems = dist_utils.broadcast_object(problems)
    if problems:
        raise ConfigError("the data cannot be trained on:\n  " + "\n  ".join(problems))


def _class_names(cfg: Config, val_loader: Any) -> list[str]:
    label_map = getattr(val_loader.dataset, "label_map", None)
    if label_map is not None:
        return list(label_map.names)
    return [f"class {index}" for index in range(int(_require(cfg, "num_classes")))]


def load_tuning_weights(
    model: nn.Module, cfg: Config, path: str, class_map: Mapping[int, int] | None, train_dataset: Any
) -> None:
    """``-t``: load what fits from ``path``; class-head rows follow ``class_map`` or ``tune_class_map``."""
    logger.info("fine-tuning from %s", path)
    checkpoint = load_checkpoint(path, cfg=cfg)
    if class_map is None:
        class_map = _class_map_by_name(cfg, path, checkpoint, train_dataset)
    load_weights_for_finetune(model, checkpoint, class_map=class_map)  # logs its report


def _class_map_by_name(
    cfg: Config, path: str, checkpoint: Mapping[str, Any], train_dataset: Any
) -> dict[int, int] | None:
    """``tune_class_map: by_name``: keep the class-head rows of classes the checkpoint also names."""
    mode = cfg.get("tune_class_map")
    if mode in (None, False, "none"):
        return None
    if mode != "by_name":
        raise ConfigError(
            f"{cfg.where('tune_class_map')} must be 'by_name' or null, got {mode!r}, "
            "e.g. -u tune_class_map=by_name"
        )
    entries = checkpoint.get("label_map") if isinstance(checkpoint, Mapping) else None
    if not entries:
        raise ConfigError(
            f"tune_class_map=by_name needs class names, but {path} has no 'label_map' "
            "(it was not saved by dfine-train); drop tune_class_map to re-initialise the class heads"
        )
    dataset_labels = getattr(train_dataset, "label_map", None)
    if dataset_labels is None:
        raise ConfigError(
            "tune_class_map=by_name needs the training dataset's class names, but "
            f"{cfg.where('train_dataloader.dataset')} has no label map"
        )
    checkpoint_names = [str(e["name"]) for e in sorted(entries, key=lambda e: int(e["label"]))]
    return class_map_from_names(dataset_labels.names, checkpoint_names)


def freeze_parameters(model: nn.Module, cfg: Config) -> list[str]:
    """Freeze parameters whose names match any regex in ``freeze``; returns every frozen name."""
    compiled = []
    for pattern in cfg.get("freeze") or []:
        try:
            compiled.append(re.compile(pattern))
        except re.error as error:
            raise ConfigError(f"{cfg.where('freeze')}: '{pattern}' is not a valid regex: {error}") from error
    for name, parameter in model.named_parameters():
        if any(p.search(name) for p in compiled):
            parameter.requires_grad_(False)
    for pattern in compiled:
        if not any(pattern.search(name) for name, _ in model.named_parameters()):
            logger.warning("freeze: '%s' matches no parameter", pattern.pattern)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen:
        shown = ", ".join(frozen[:20]) + (" ..." if len(frozen) > 20 else "")
        logger.info("%d frozen parameters: %s", len(frozen), shown)
    return frozen


def wrap_for_distributed(
    model: nn.Module, cfg: Config, context: dist_utils.DistributedContext
) -> tuple[nn.Module, nn.Module]:
    """Prepare ``model`` for training in ``context``'s process group.

    Returns:
        ``(model, train_model)``: ``model`` is the module to save and average (SyncBN-converted under
        torchrun on CUDA unless ``sync_bn: false``), ``train_model`` its DistributedDataParallel wrapper, or
        ``model`` itself in a single process.
    """
    if context.world_size == 1:
        return model, model
    if cfg.get("sync_bn", True) and context.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    wrapped = nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=bool(cfg.get("find_unused_parameters"))
    )
    return model, wrapped


def _build_optimization(
    model: nn.Module, cfg: Config, batches_per_epoch: int, epochs: int
) -> tuple[torch.optim.Optimizer, LRSchedule]:
    groups = param_groups_from_config(model, cfg["optimizer"])
    optimizer = build_optimizer(model, cfg["optimizer"], groups)
    logger.info("optimizer groups:\n%s", group_summary(groups, optimizer))
    steps_per_epoch = max(1, batches_per_epoch // int(cfg.get("grad_accum_steps") or 1))
    lr_schedule = build_lr_schedule(optimizer, *lr_blocks(cfg), steps_per_epoch, epochs)
    return optimizer, lr_schedule


def _build_step(
    cfg: Config,
    context: dist_utils.DistributedContext,
    output_dir: Path,
    state: RunState,
    model: nn.Module,
    train_model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_schedule: LRSchedule,
    ema: ModelEMA | None,
) -> TrainStep:
    """The training step with the precision :func:`choose_precision` picks for this device."""
    use_amp, amp_dtype = choose_precision(cfg, context.device)
    scaler = build_grad_scaler(cfg.get("scaler"), context.device, use_amp, amp_dtype, cfg.where("scaler"))
    return TrainStep(
        model,
        criterion,
        optimizer,
        lr_schedule,
        ema,
        state,
        context.device,
        train_model=train_model,
        use_amp=use_amp,
        amp_dtype=amp_dtype,
        scaler=scaler,
        grad_accum_steps=int(cfg.get("grad_accum_steps") or 1),
        clip_max_norm=float(cfg.get("clip_max_norm") or 0.0),
        # DDP without find_unused_parameters needs every parameter in each rank's graph (TrainStep.backward).
        anchor_every_parameter=context.world_size > 1 and not cfg.get("find_unused_parameters"),
        checkpoint_path=output_dir / "last.pth",
    )
