"""The training loop: one readable ``Trainer`` that turns config, model, loss and data into checkpoints.

Per step: ``autocast -> model -> criterion (fp32) -> scaler/backward -> clip -> optimizer -> EMA -> lr``.
Per epoch: ``train -> last.pth -> evaluate -> best.pth / eval.json -> log``. The D-FINE two-stage recipe is
an explicit phase: at ``stop_epoch`` strong augmentation and multi-scale switch off (the data pipeline does
that from the epoch number), the best stage-1 weights are reloaded and EMA restarts with
``ema_restart_decay``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import random
import re
import resource
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from dfine import distributed as dist_utils
from dfine.checkpoint import (
    capture_rng_state,
    class_map_from_names,
    load_checkpoint,
    load_weights_for_finetune,
    load_weights_strict,
    restore_rng_state,
    save_atomic,
)
from dfine.config import Config, dump_config
from dfine.config.build import build_criterion, build_model, build_postprocessor
from dfine.config.registry import ConfigError
from dfine.engine.ema import ModelEMA
from dfine.engine.health import zero_ap_warning
from dfine.engine.optim import build_optimizer, group_summary, param_groups_from_config, scale_for_batch_size
from dfine.engine.reports import EvalReport
from dfine.engine.run_log import RunLog
from dfine.engine.schedules import build_lr_schedule

__all__ = ["NonFiniteLossError", "Trainer"]

logger = logging.getLogger(__name__)

# Consecutive non-finite steps tolerated before the run stops (a single bad batch is skipped).
MAX_NON_FINITE_STEPS = 5


class NonFiniteLossError(FloatingPointError):
    """Training produced non-finite losses repeatedly; the last good checkpoint is untouched."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _move_targets(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [
        {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in t.items()}
        for t in targets
    ]


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Trainer:
    """Fit a D-FINE model described by a resolved config.

    Args:
        cfg: the resolved config (:func:`dfine.load_config`).
        resume: checkpoint to resume everything from, ``"auto"`` for ``output_dir/last.pth`` when present.
        tune: checkpoint to take weights from (fine-tuning); optimiser, schedules and epoch start fresh.
        class_map: for ``tune``, ``{new_label: checkpoint_label}`` rows of the class heads to keep.
    """

    def __init__(
        self,
        cfg: Config,
        resume: str | None = None,
        tune: str | None = None,
        class_map: Mapping[int, int] | None = None,
    ) -> None:
        if resume and tune:
            raise ConfigError(
                "use either -r/--resume (continue a run) or -t/--tune (start from weights), not both"
            )
        self.context = dist_utils.init_distributed(cfg.get("device"))
        self.device = self.context.device
        self.output_dir = Path(cfg.get("output_dir") or "./output/run")
        dist_utils.setup_logging(self.output_dir, self.context.rank)
        self.seed = (
            int(cfg["seed"]) if cfg.get("seed") is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        )
        self.seed = dist_utils.broadcast_object(self.seed)
        seed_everything(self.seed + self.context.rank)

        self.cfg = self._scaled_config(cfg)
        self.epochs = int(self._require("epochs"))
        self.grad_accum_steps = int(self.cfg.get("grad_accum_steps") or 1)
        self.clip_max_norm = float(self.cfg.get("clip_max_norm") or 0.0)
        self.eval_interval = int(self.cfg.get("eval_interval") or 1)
        self.checkpoint_freq = int(self.cfg.get("checkpoint_freq") or 0)
        self.print_freq = max(1, int(self.cfg.get("print_freq") or 100))
        self.patience = int(self.cfg.get("patience") or 0)  # 0: no early stopping
        collate = self.cfg.get("train_dataloader", {}).get("collate_fn") or {}
        self.stop_epoch = collate.get("stop_epoch")
        self.ema_restart_decay = collate.get("ema_restart_decay")

        self.train_loader, self.val_loader = self._build_loaders()
        self.model = build_model(self.cfg).to(self.device)
        self.criterion = build_criterion(self.cfg).to(self.device)
        self.postprocessor = build_postprocessor(self.cfg).to(self.device)
        if tune:
            self._load_tuning_weights(tune, class_map)
        self.frozen = self._freeze(self.cfg.get("freeze") or [])
        self.train_model = self._wrap_for_distributed(self.model)
        # A rank whose batch has no boxes builds no denoising queries, so `denoising_class_embed` gets no
        # gradient there; DDP without find_unused_parameters then waits on it forever (or mismatches its
        # collectives). A zero-weighted term over every trainable tensor keeps them all in each rank's graph.
        keep_all = self.context.world_size > 1 and not self.cfg.get("find_unused_parameters")
        self.graph_anchors = [p for p in self.model.parameters() if p.requires_grad] if keep_all else []

        groups = param_groups_from_config(self.model, self.cfg["optimizer"])
        self.optimizer = build_optimizer(self.model, self.cfg["optimizer"], groups)
        logger.info("optimizer groups:\n%s", group_summary(groups, self.optimizer))
        steps_per_epoch = max(1, len(self.train_loader) // self.grad_accum_steps)
        self.lr_schedule = build_lr_schedule(
            self.optimizer,
            self.cfg.get("lr_scheduler"),
            self.cfg.get("lr_warmup_scheduler"),
            steps_per_epoch,
            self.epochs,
        )
        self.ema = self._build_ema()
        self.use_amp = bool(self.cfg.get("use_amp"))
        self.amp_dtype = self._amp_dtype()
        if self.use_amp and self.device.type == "cpu" and not _cpu_has_fast_bf16():
            # Measured here: bf16 autocast made a D-FINE-N step ~8x slower on a CPU without native bf16.
            logger.warning(
                "use_amp: this CPU has no native bfloat16, where autocast is far slower; training fp32"
            )
            self.use_amp = False
        scaler_enabled = self.use_amp and self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaler_enabled)

        self.epoch = 0  # next epoch to train
        self.global_step = 0
        self.best_ap = -1.0
        self.best_epoch = -1
        self.best_stage1_ap = -1.0
        self.stage = 1
        self.non_finite_steps = 0
        self.history: list[dict[str, Any]] = []
        # Total loss of each optimizer step run here (mean over micro-batches and ranks); kept in memory only.
        self.step_losses: list[float] = []
        self.warned_zero_ap = False
        # Where the running epoch started: a Ctrl-C save rewinds the schedule to it (`_save_interrupted`).
        self.epoch_start_schedule: dict[str, Any] | None = None
        self.epoch_start_step = 0
        if resume:
            self._resume(resume)
        self.run_log = RunLog(self.output_dir, self.cfg.get("summary_dir"), enabled=self.context.is_main)
        self.run_log.restart(self.history)
        self.report = EvalReport(
            self.output_dir,
            self.run_log,
            class_names=self._class_names(),
            enabled=self.context.is_main,
        )
        if self.context.is_main:
            dump_config(self.cfg, self.output_dir / "config.yml")

    # ------------------------------------------------------------------------------------------ set-up

    def _class_names(self) -> list[str]:
        label_map = getattr(self.val_loader.dataset, "label_map", None)
        if label_map is not None:
            return list(label_map.names)
        return [f"class {index}" for index in range(int(self._require("num_classes")))]

    def _require(self, key: str) -> Any:
        if self.cfg.get(key) is None:
            raise ConfigError(f"{self.cfg.where(key)} is missing: training needs '{key}' at the top level")
        return self.cfg[key]

    def _scaled_config(self, cfg: Config) -> Config:
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

    def _build_loaders(self) -> tuple[Any, Any]:
        from dfine.data import (
            build_dataloader,  # data sits beside engine; imported here to keep start-up light
        )

        common = {
            "world_size": self.context.world_size,
            "rank": self.context.rank,
            "seed": self.seed,
            "num_classes": int(self._require("num_classes")),
        }
        train = build_dataloader(
            self._require("train_dataloader"),
            split="train",
            where=self.cfg.where("train_dataloader"),
            **common,
        )
        val = build_dataloader(
            self._require("val_dataloader"), split="val", where=self.cfg.where("val_dataloader"), **common
        )
        self._check_data(train.dataset, val.dataset)
        return train, val

    def _check_data(self, *datasets: Any) -> None:
        """Fail at start-up, not hours in, when image files are missing (``--check-data`` looks deeper)."""
        from dfine.data import check_dataset

        problems = []
        if self.context.is_main:
            for dataset in datasets:
                report = check_dataset(dataset, images="exists")
                for line in report.summary_lines():
                    logger.info("data: %s", line)
                if not report.ok:
                    problems.extend(report.summary_lines())
        problems = dist_utils.broadcast_object(problems)
        if problems:
            raise ConfigError("the data cannot be trained on:\n  " + "\n  ".join(problems))

    def _load_tuning_weights(self, path: str, class_map: Mapping[int, int] | None) -> None:
        logger.info("fine-tuning from %s", path)
        checkpoint = load_checkpoint(path)
        if class_map is None:
            class_map = self._class_map_by_name(path, checkpoint)
        load_weights_for_finetune(self.model, checkpoint, class_map=class_map)  # logs its report

    def _class_map_by_name(self, path: str, checkpoint: Mapping[str, Any]) -> dict[int, int] | None:
        """``tune_class_map: by_name``: keep the class-head rows of classes the checkpoint also names."""
        mode = self.cfg.get("tune_class_map")
        if mode in (None, False, "none"):
            return None
        if mode != "by_name":
            raise ConfigError(
                f"{self.cfg.where('tune_class_map')} must be 'by_name' or null, got {mode!r}, "
                "e.g. -u tune_class_map=by_name"
            )
        entries = checkpoint.get("label_map") if isinstance(checkpoint, Mapping) else None
        if not entries:
            raise ConfigError(
                f"tune_class_map=by_name needs class names, but {path} has no 'label_map' "
                "(it was not saved by dfine-train); drop tune_class_map to re-initialise the class heads"
            )
        dataset_labels = getattr(self.train_loader.dataset, "label_map", None)
        if dataset_labels is None:
            raise ConfigError(
                "tune_class_map=by_name needs the training dataset's class names, but "
                f"{self.cfg.where('train_dataloader.dataset')} has no label map"
            )
        checkpoint_names = [str(e["name"]) for e in sorted(entries, key=lambda e: int(e["label"]))]
        return class_map_from_names(dataset_labels.names, checkpoint_names)

    def _freeze(self, patterns: list[str]) -> list[str]:
        """Freeze parameters whose names match any regex in ``freeze``; returns every frozen name."""
        compiled = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise ConfigError(
                    f"{self.cfg.where('freeze')}: '{pattern}' is not a valid regex: {error}"
                ) from error
        for name, parameter in self.model.named_parameters():
            if any(p.search(name) for p in compiled):
                parameter.requires_grad_(False)
        for pattern in compiled:
            if not any(pattern.search(name) for name, _ in self.model.named_parameters()):
                logger.warning("freeze: '%s' matches no parameter", pattern.pattern)
        frozen = [name for name, p in self.model.named_parameters() if not p.requires_grad]
        if frozen:
            logger.info(
                "%d frozen parameters: %s",
                len(frozen),
                ", ".join(frozen[:20]) + (" ..." if len(frozen) > 20 else ""),
            )
        return frozen

    def _wrap_for_distributed(self, model: nn.Module) -> nn.Module:
        if self.context.world_size == 1:
            return model
        if self.cfg.get("sync_bn", True) and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            self.model = model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=bool(self.cfg.get("find_unused_parameters"))
        )

    def _build_ema(self) -> ModelEMA | None:
        if not self.cfg.get("use_ema"):
            return None
        block = {k: v for k, v in (self.cfg.get("ema") or {}).items() if k != "type"}
        return ModelEMA(self.model, **block)

    def _amp_dtype(self) -> torch.dtype:
        name = str(self.cfg.get("amp_dtype") or "float16")
        if name not in ("float16", "bfloat16"):
            raise ConfigError(f"{self.cfg.where('amp_dtype')} must be float16 or bfloat16, got '{name}'")
        if self.device.type == "cpu" and name == "float16" and self.use_amp:
            logger.info("use_amp on CPU runs bfloat16 autocast (float16 autocast is CUDA-only)")
            return torch.bfloat16
        return getattr(torch, name)

    def describe_schedule(self) -> str:
        """The resolved schedule, printed once at start-up."""
        steps = self.lr_schedule.describe()
        batch = (self.cfg.get("train_dataloader") or {}).get("total_batch_size")
        ema = f"decay {self.ema.decay} (warm-up {self.ema.warmups} steps)" if self.ema else "off"
        parts = [
            f"epochs {self.epochs}",
            f"steps/epoch {self.lr_schedule.steps_per_epoch}",
            f"schedule {steps}",
            f"stop_epoch {self.stop_epoch}",
            f"EMA {ema}",
            f"effective batch {batch} x {self.grad_accum_steps} accumulation",
            f"AMP {self.amp_dtype if self.use_amp else 'off'}",
            f"device {self.device} x {self.context.world_size}",
        ]
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train from ``self.epoch`` to ``epochs``; returns the best metrics seen.

        Stops early after ``patience`` evaluated epochs without a new best AP. Ctrl-C saves the weights of the
        interrupted epoch to ``last.pth`` (``-r auto`` redoes that epoch from them) and re-raises.
        """
        logger.info("schedule: %s", self.describe_schedule())
        last_metrics: dict[str, Any] = {}
        try:
            while self.epoch < self.epochs:
                last_metrics = self._run_epoch(self.epoch) or last_metrics
                if self._out_of_patience():
                    break
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        finally:
            self.run_log.close()
        return {"best_ap": self.best_ap, "best_epoch": self.best_epoch, **last_metrics}

    def _run_epoch(self, epoch: int) -> dict[str, Any] | None:
        """Train, evaluate, save and report one epoch; returns its metrics when it was evaluated."""
        if self.stop_epoch is not None and epoch >= self.stop_epoch and self.stage == 1:
            self._enter_stage_two()
        seed_everything(self.seed + 1000 * epoch + self.context.rank)  # epochs replay exactly on resume
        self.train_loader.set_epoch(epoch)  # shuffling, augmentation policy and multi-scale
        self.epoch_start_schedule = self.lr_schedule.state_dict()
        self.epoch_start_step = self.global_step
        start = time.time()
        train_stats = self.train_one_epoch(epoch)
        self.epoch = epoch + 1
        record: dict[str, Any] = {"epoch": epoch, "stage": self.stage, **train_stats}
        record["time"] = time.time() - start
        record["memory_mb"] = _peak_memory_mb(self.device)
        metrics = None
        if self._should_evaluate(epoch):
            metrics = self.evaluate()
            record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            self._track_best(epoch, metrics)
        self.history.append(record)
        if metrics is not None:
            record.update(self._report_evaluation(epoch))
        self.run_log.epoch(record)
        self._warn_if_ap_stuck_at_zero()
        self._save_epoch_checkpoints(epoch)
        logger.info("epoch %d: %s", epoch, _format_record(record))
        return metrics

    def _report_evaluation(self, epoch: int) -> dict[str, Any]:
        """Curves, pictures and results.png after an evaluation (rank 0); the best-F1 numbers for the log."""
        return self.report.after_evaluation(
            epoch,
            self.history,
            self.evaluator,
            self.eval_model,
            self.postprocessor,
            self.val_loader.dataset,
            self.device,
        )

    def _out_of_patience(self) -> bool:
        evaluated = [r["epoch"] for r in self.history if "val_AP" in r]
        if not self.patience or not evaluated or self.best_epoch < 0:
            return False
        waited = sum(1 for epoch in evaluated if epoch > self.best_epoch)
        if waited < self.patience:
            return False
        logger.info(
            "early stop: no AP gain in %d evaluations since epoch %d (best AP %.4f; patience %d)",
            waited,
            self.best_epoch,
            self.best_ap,
            self.patience,
        )
        return True

    def _warn_if_ap_stuck_at_zero(self) -> None:
        message = None if self.warned_zero_ap else zero_ap_warning(self.history)
        if message:
            logger.warning(message)
            self.warned_zero_ap = True

    def _should_evaluate(self, epoch: int) -> bool:
        return (epoch + 1) % self.eval_interval == 0 or epoch + 1 == self.epochs

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns the epoch's mean loss terms and lr."""
        self.train_model.train()
        self.criterion.train()
        sums: dict[str, float] = {}
        count = 0
        pending: list[float] = []  # total loss of each micro-batch since the last optimizer step
        lr_used = self.optimizer.param_groups[0]["lr"]
        seen_images = 0
        start = time.time()
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}/{self.epochs - 1}",
            leave=False,
            dynamic_ncols=True,
            disable=not self.context.is_main,
        )
        for index, (images, targets) in enumerate(bar):
            images = images.to(self.device, non_blocking=True)
            targets = _move_targets(targets, self.device)
            last_micro_step = (index + 1) % self.grad_accum_steps == 0
            lr_used = self.optimizer.param_groups[0]["lr"]
            losses = self.train_step(images, targets, index, sync=last_micro_step)
            seen_images += images.shape[0] * self.context.world_size
            if losses is None:
                pending.clear()
                continue
            pending.append(sum(losses.values()))
            if last_micro_step:
                self.optimizer_step()
                self.step_losses.append(sum(pending) / len(pending))
                pending.clear()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            images_per_s = seen_images / max(time.time() - start, 1e-9)
            # drawn at tqdm's own refresh interval, not forced on every step
            bar.set_postfix_str(
                f"loss {sum(losses.values()):.3f} lr {lr_used:.2e} img/s {images_per_s:.1f}", refresh=False
            )
            if last_micro_step and self.global_step % self.print_freq == 0:
                lrs = [group["lr"] for group in self.optimizer.param_groups]
                self.run_log.step(self.global_step, losses, lrs, images_per_s)
        bar.close()
        self.lr_schedule.epoch_step()
        self._sync_buffers()
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats["loss"] = sum(stats.values())
        stats["lr"] = lr_used  # the lr of the epoch's last step (the schedule has moved on since)
        stats["images_per_s"] = seen_images / max(time.time() - start, 1e-9)
        return stats

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (model and EMA) before evaluating and saving.

        Without SyncBN (CPU, or ``sync_bn: false``) each rank's BatchNorm running statistics follow its own
        last batch, and the EMA averages them, so ranks would evaluate slightly different models.
        """
        if self.context.world_size == 1:
            return
        modules = [self.model] + ([self.ema.module] if self.ema is not None else [])
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def train_step(
        self, images: Tensor, targets: list[dict[str, Any]], index: int, sync: bool = True
    ) -> dict[str, float] | None:
        """Forward, loss and backward of one (micro-)batch; gradients accumulate until :meth:`optimizer_step`.

        Returns:
            The loss terms averaged over ranks, or ``None`` when the step was skipped for a non-finite loss.
        """
        no_sync = getattr(self.train_model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        meta = {"epoch": self.epoch, "step": index, "global_step": self.global_step}
        with context:
            with self._autocast():
                outputs = self.train_model(images, targets)
            losses = self.criterion(outputs, targets, **meta)  # fp32: the criterion upcasts
            loss = sum(losses.values())
            if self.graph_anchors:
                loss = loss + 0.0 * torch.stack([p.reshape(-1)[0] for p in self.graph_anchors]).sum()
            # one host sync per step: the sum is non-finite exactly when a term is (or overflows)
            non_finite = not bool(torch.isfinite(loss))
            bad = [k for k, v in losses.items() if not torch.isfinite(v)] if non_finite else []
            if self._any_rank(non_finite):
                self._skip_non_finite(bad, losses)
                return None
            self.non_finite_steps = 0
            self.scaler.scale(loss / self.grad_accum_steps).backward()
        return dist_utils.reduce_dict_for_logging({k: v.detach() for k, v in losses.items()})

    def _any_rank(self, flag: bool) -> bool:
        if self.context.world_size == 1:
            return flag
        value = torch.tensor(float(flag), device=self.device)
        return bool(dist_utils.all_reduce_sum(value).item() > 0)

    def _skip_non_finite(self, bad: list[str], losses: Mapping[str, Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.non_finite_steps += 1
        terms = ", ".join(f"{k}={losses[k].item()}" for k in bad) or "(on another rank)"
        logger.warning(
            "non-finite loss at epoch %d step %d, step skipped: %s", self.epoch, self.global_step, terms
        )
        if self.non_finite_steps >= MAX_NON_FINITE_STEPS:
            raise NonFiniteLossError(
                f"{self.non_finite_steps} consecutive steps had non-finite losses ({terms}) "
                f"at epoch {self.epoch}; "
                f"stopping. {self.output_dir / 'last.pth'} holds the last good state. Try a lower lr, "
                "clip_max_norm, or use_amp=false, and check the data (dfine-train --check-data)."
            )

    def optimizer_step(self) -> None:
        """Clip, step, EMA update and lr update after the gradients of one (accumulated) batch."""
        if self.clip_max_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.lr_schedule.step()
        self.global_step += 1

    # ------------------------------------------------------------------------------------------ evaluation

    @functools.cached_property
    def evaluator(self) -> Any:
        """One COCO evaluator per run (ground truth indexed once); its detections also feed the curves."""
        from dfine.evaluation.coco_evaluator import CocoEvaluator

        return CocoEvaluator(self.val_loader.dataset.to_coco_dict())

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as the result: EMA when enabled."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict[str, Any]:
        """COCO metrics of :attr:`eval_model` on the validation set (written to ``output_dir/eval.json``)."""
        from dfine.evaluation.loop import evaluate

        metrics = evaluate(self.eval_model, self.postprocessor, self.val_loader, self.device, self.evaluator)
        if self.context.is_main:
            (self.output_dir / "eval.json").write_text(
                json.dumps({"epoch": self.epoch - 1, **metrics}, indent=2)
            )
        return metrics

    def _track_best(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        ap = float(metrics.get("AP", -1.0))
        if self.stage == 1 and ap > self.best_stage1_ap:
            self.best_stage1_ap = ap
            self._save("best_stage1.pth")
        if ap > self.best_ap:
            self.best_ap, self.best_epoch = ap, epoch
            self._save("best.pth")
            logger.info("new best AP %.4f at epoch %d", ap, epoch)

    # ------------------------------------------------------------------------------------------ stage two

    def _enter_stage_two(self) -> None:
        """Reload the best stage-1 weights (model and EMA) and restart EMA: D-FINE's second training phase."""
        dist_utils.barrier()  # rank 0 may still be writing best_stage1.pth
        path = self.output_dir / "best_stage1.pth"
        if path.is_file():
            checkpoint = load_checkpoint(path, map_location=self.device)
            self.model.load_state_dict(checkpoint["model"])
            if self.ema is not None and "ema" in checkpoint:
                self.ema.load_state_dict(checkpoint["ema"])
            logger.info("stage 2 from epoch %d: reloaded %s (AP %.4f)", self.epoch, path, self.best_stage1_ap)
        else:
            logger.warning(
                "stage 2 from epoch %d: no %s (never evaluated in stage 1); keeping the current weights",
                self.epoch,
                path,
            )
        if self.ema is not None:
            self.ema.restart(self.ema_restart_decay)
        self.stage = 2

    # ------------------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly; ``model``, ``ema.module`` use original key names."""
        label_map = getattr(getattr(self.train_loader, "dataset", None), "label_map", None)
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "last_epoch": self.epoch - 1,
            "global_step": self.global_step,
            "stage": self.stage,
            "best": {"ap": self.best_ap, "epoch": self.best_epoch, "stage1_ap": self.best_stage1_ap},
            "seed": self.seed,
            "rng": capture_rng_state(),
            "history": self.history,
            "label_map": label_map.to_entries() if label_map is not None else None,
            "config": self.cfg.to_dict(),
        }

    def _save(self, name: str) -> None:
        if self.context.is_main:
            save_atomic(self.state_dict(), self.output_dir / name)

    def _save_interrupted(self) -> None:
        """Ctrl-C: keep the weights trained so far in ``last.pth``, the schedule rewound to the epoch's start.

        The interrupted epoch counts as not done, so ``-r auto`` runs it again from its first batch, starting
        from these weights, with the lr it would have had; nothing finished is lost.
        """
        if not self.context.is_main or self.epoch_start_schedule is None:
            return
        state = self.state_dict()
        interrupted_at = self.global_step
        state["lr_schedule"] = self.epoch_start_schedule
        state["global_step"] = self.epoch_start_step
        state["interrupted"] = {"epoch": self.epoch, "global_step": interrupted_at}
        path = self.output_dir / "last.pth"
        save_atomic(state, path)
        logger.warning(
            "interrupted in epoch %d (step %d): saved %s; continue with -r auto (or -r %s), which redoes "
            "epoch %d from these weights",
            self.epoch,
            interrupted_at,
            path,
            path,
            self.epoch,
        )

    def _save_epoch_checkpoints(self, epoch: int) -> None:
        self._save("last.pth")
        if self.checkpoint_freq and (epoch + 1) % self.checkpoint_freq == 0:
            self._save(f"checkpoint{epoch:04}.pth")

    def _resume(self, resume: str) -> None:
        path = self.output_dir / "last.pth" if resume == "auto" else Path(resume)
        if resume == "auto" and not path.is_file():
            logger.info("-r auto: no %s yet, starting a fresh run", path)
            return
        checkpoint = load_checkpoint(path, map_location=self.device)
        if "optimizer" not in checkpoint or "epoch" not in checkpoint:
            raise ConfigError(
                f"{path} holds weights only (no optimizer/epoch state), so it cannot be resumed: "
                f"use -t {path} to fine-tune from it instead"
            )
        load_weights_strict(self.model, checkpoint["model"])
        if self.ema is not None and checkpoint.get("ema"):
            self.ema.load_state_dict(checkpoint["ema"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.lr_schedule.load_state_dict(checkpoint["lr_schedule"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch = int(checkpoint["epoch"])
        self.global_step = int(checkpoint["global_step"])
        self.stage = int(checkpoint.get("stage", 1))
        best = checkpoint.get("best") or {}
        self.best_ap = float(best.get("ap", -1.0))
        self.best_epoch = int(best.get("epoch", -1))
        self.best_stage1_ap = float(best.get("stage1_ap", -1.0))
        self.seed = int(checkpoint.get("seed", self.seed))
        self.history = list(checkpoint.get("history") or [])
        if checkpoint.get("rng"):
            restore_rng_state(checkpoint["rng"])
        logger.info(
            "resumed %s: next epoch %d, step %d, stage %d", path, self.epoch, self.global_step, self.stage
        )


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# The epoch summary shows these; every term is in metrics.jsonl / TensorBoard.
_SUMMARY_KEYS = (
    ("loss", "loss", "{:.4g}"),
    ("loss_vfl", "vfl", "{:.4g}"),
    ("loss_bbox", "l1", "{:.4g}"),
    ("loss_giou", "giou", "{:.4g}"),
    ("loss_fgl", "fgl", "{:.4g}"),
    ("loss_ddf_aux_0", "ddf", "{:.4g}"),
    ("lr", "lr", "{:.2e}"),
    ("val_AP", "AP", "{:.4f}"),
    ("val_AP50", "AP50", "{:.4f}"),
    ("val_best_f1", "F1", "{:.3f}"),
    ("time", "time", "{:.0f}s"),
    ("images_per_s", "img/s", "{:.1f}"),
    ("memory_mb", "mem", "{:.0f}MB"),
)


def _format_record(record: Mapping[str, Any]) -> str:
    parts = [f"stage {record.get('stage', 1)}"]
    for key, label, form in _SUMMARY_KEYS:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(f"{label} {form.format(value)}")
    return " | ".join(parts)
