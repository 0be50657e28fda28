"""The training loop: :class:`Trainer` runs the epochs of a :class:`~dfine.engine.setup.TrainingRun`.

Per epoch: ``stage switch -> train -> evaluate (best.pth, best_stage1.pth) -> last.pth -> log``. Each step
is :class:`~dfine.engine.step.TrainStep`. The D-FINE two-stage recipe is an explicit phase: at
``stop_epoch`` strong augmentation and multi-scale switch off (the data pipeline does that from the epoch
number), the best stage-1 weights are reloaded and EMA restarts with ``ema_restart_decay``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dfine import distributed as dist_utils
from dfine.checkpoint import load_checkpoint
from dfine.engine.health import zero_ap_warning
from dfine.engine.reports import EvalReport
from dfine.engine.run_log import EpochProgress, RunLog, format_epoch_record, peak_memory_mb
from dfine.engine.run_state import seed_everything
from dfine.engine.signals import StopRequested, StopSignals
from dfine.evaluation.loop import evaluate

if TYPE_CHECKING:
    from dfine.engine.setup import TrainingRun

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer:
    """Fit the model of a training run: epochs, evaluation, best/last checkpoints, patience and stage two.

    Args:
        run: the built parts (:func:`dfine.engine.setup.build_training`), resumed when asked to.
    """

    def __init__(self, run: TrainingRun) -> None:
        self.run = run
        self.state = run.state
        self.step = run.step
        self.checkpoints = run.checkpoints
        self.warned_zero_ap = False
        self.signals = StopSignals()  # installed while fit() runs
        enabled = run.context.is_main
        loggers = run.cfg.get("loggers")
        self.run_log = RunLog(run.output_dir, run.cfg.get("summary_dir"), enabled, loggers, run.cfg)
        self.run_log.restart(self.state.history)  # after a resume: epochs the checkpoint never saw go
        self.report = EvalReport(run.output_dir, self.run_log, class_names=run.class_names, enabled=enabled)

    # ------------------------------------------------------------------------------------------ the loop

    def fit(self) -> dict[str, Any]:
        """Train from ``state.epoch`` to ``epochs``; returns the best metrics seen.

        Stops early after ``patience`` evaluated epochs without a new best AP. Ctrl-C saves the weights of the
        interrupted epoch to ``last.pth`` (``-r auto`` redoes that epoch from them) and re-raises. SIGTERM or
        SIGUSR1 (preemption) does the same after the current step on every rank and raises
        :class:`~dfine.engine.signals.StopRequested`.
        """
        logger.info("schedule: %s", self.run.describe())
        last_metrics: dict[str, Any] = {}
        try:
            with self.signals:
                while self.state.epoch < self.run.epochs:
                    self._stop_if_requested(mid_epoch=False)
                    last_metrics = self._run_epoch(self.state.epoch) or last_metrics
                    if self._out_of_patience():
                        break
        except KeyboardInterrupt:
            self.checkpoints.save_interrupted()
            raise
        finally:
            self.run_log.close()
        return {"best_ap": self.state.best_ap, "best_epoch": self.state.best_epoch, **last_metrics}

    def _run_epoch(self, epoch: int) -> dict[str, Any] | None:
        """Train, evaluate, save and report one epoch; returns its metrics when it was evaluated."""
        run, state = self.run, self.state
        if run.stop_epoch is not None and epoch >= run.stop_epoch and state.stage == 1:
            self._enter_stage_two()  # first: this epoch's seed, data and steps all belong to stage 2
        seed_everything(state.seed + 1000 * epoch + run.context.rank)  # epochs replay exactly on resume
        run.train_loader.set_epoch(epoch)  # shuffling, augmentation policy and multi-scale
        state.epoch_start_schedule = run.lr_schedule.state_dict()  # what a Ctrl-C save rewinds to
        state.epoch_start_step = state.global_step
        start = time.time()
        train_stats = self.train_one_epoch(epoch)
        state.epoch = epoch + 1
        record: dict[str, Any] = {"epoch": epoch, "stage": state.stage, **train_stats}
        record["failed_samples"] = self._failed_samples()
        record["time"] = time.time() - start
        record["memory_mb"] = peak_memory_mb(run.device)
        metrics = None
        # A stop requested by now skips the evaluation (minutes on a large set): last.pth is saved first.
        stopping = epoch + 1 < run.epochs and self.signals.stop_requested()
        if self._should_evaluate(epoch) and not stopping:
            metrics = self.evaluate()
            record.update({f"val_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
            self._track_best(epoch, metrics)  # best.pth, and best_stage1.pth while in stage 1
        state.history.append(record)
        if metrics is not None:
            record.update(self._report_evaluation(epoch))
        self.run_log.epoch(record)
        self._warn_if_ap_stuck_at_zero()
        self.checkpoints.save_epoch(epoch, run.checkpoint_freq)  # last.pth, after evaluation
        logger.info("epoch %d: %s", epoch, format_epoch_record(record))
        return metrics

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training data; returns the epoch's mean loss terms, lr and images per second."""
        run, step = self.run, self.step
        run.train_model.train()
        run.criterion.train()
        sums: dict[str, float] = {}
        count = 0
        lr_used = step.lr
        seen_images = 0
        start = time.time()
        progress = EpochProgress(
            run.train_loader, epoch, run.epochs, run.print_freq, enabled=run.context.is_main
        )
        for index, (images, targets) in enumerate(progress):
            lr_used = step.lr
            result = step(images, targets, index)
            self._stop_if_requested(mid_epoch=True)
            seen_images += images.shape[0] * run.context.world_size
            if result is None:
                continue  # skipped for a non-finite loss (the step logged which term)
            for key, value in result.losses.items():
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            images_per_s = seen_images / max(time.time() - start, 1e-9)
            progress.update(index, sum(result.losses.values()), lr_used, images_per_s)
            if result.optimizer_stepped and self.state.global_step % run.print_freq == 0:
                lrs = [group["lr"] for group in run.optimizer.param_groups]
                self.run_log.step(self.state.global_step, result.losses, lrs, images_per_s)
        progress.close()
        run.lr_schedule.epoch_step()
        self._sync_buffers()
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats["loss"] = sum(stats.values())
        stats["lr"] = lr_used  # the lr of the epoch's last step (the schedule has moved on since)
        stats["images_per_s"] = seen_images / max(time.time() - start, 1e-9)
        return stats

    def _failed_samples(self) -> int:
        """Training samples that failed to load this epoch, all ranks together (replaced, see the dataset)."""
        count = torch.tensor([float(getattr(self.run.train_loader.dataset, "failed_samples", 0))])
        return int(dist_utils.all_reduce_sum(count).item())  # the count itself when not distributed

    def _stop_if_requested(self, mid_epoch: bool) -> None:
        """After SIGTERM/SIGUSR1 on any rank: save as Ctrl-C does (mid-epoch), then stop every rank together.

        Between epochs ``last.pth`` is already complete, so nothing more is written.
        """
        if not self.signals.stop_requested():
            return
        path = self.run.output_dir / "last.pth"
        logger.warning("received %s: stopping after this step", self.signals.signal_name)
        if mid_epoch:
            self.checkpoints.save_interrupted()
        dist_utils.barrier()  # no rank may exit (and make torchrun stop the others) before rank 0 has saved
        raise StopRequested(self.signals.signal_name, str(path))

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (model and EMA) before evaluating and saving.

        Without SyncBN (CPU, or ``sync_bn: false``) each rank's BatchNorm running statistics follow its own
        last batch, and the EMA averages them, so ranks would evaluate slightly different models.
        """
        if self.run.context.world_size == 1:
            return
        modules = [self.run.model] + ([self.run.ema.module] if self.run.ema is not None else [])
        for module in modules:
            for buffer in module.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _should_evaluate(self, epoch: int) -> bool:
        return (epoch + 1) % self.run.eval_interval == 0 or epoch + 1 == self.run.epochs

    # ------------------------------------------------------------------------------------------ evaluation

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved as the result: EMA when enabled."""
        return self.run.ema.module if self.run.ema is not None else self.run.model

    def evaluate(self) -> dict[str, Any]:
        """COCO metrics of :attr:`eval_model` on the validation set (written to ``output_dir/eval.json``)."""
        run = self.run
        metrics = evaluate(self.eval_model, run.postprocessor, run.val_loader, run.device, run.evaluator)
        if run.context.is_main:
            (run.output_dir / "eval.json").write_text(
                json.dumps({"epoch": self.state.epoch - 1, **metrics}, indent=2)
            )
        return metrics

    def _track_best(self, epoch: int, metrics: Mapping[str, Any]) -> None:
        state = self.state
        ap = float(metrics.get("AP", -1.0))
        if state.stage == 1 and ap > state.best_stage1_ap:
            state.best_stage1_ap = ap
            self.checkpoints.save("best_stage1.pth")
        if ap > state.best_ap:
            state.best_ap, state.best_epoch = ap, epoch
            self.checkpoints.save("best.pth")
            logger.info("new best AP %.4f at epoch %d", ap, epoch)

    def _report_evaluation(self, epoch: int) -> dict[str, Any]:
        """Curves, pictures and results.png after an evaluation (rank 0); the best-F1 numbers for the log."""
        run = self.run
        return self.report.after_evaluation(
            epoch,
            self.state.history,
            run.evaluator,
            self.eval_model,
            run.postprocessor,
            run.val_loader.dataset,
            run.device,
        )

    def _out_of_patience(self) -> bool:
        state, patience = self.state, self.run.patience
        evaluated = [r["epoch"] for r in state.history if "val_AP" in r]
        if not patience or not evaluated or state.best_epoch < 0:
            return False
        waited = sum(1 for epoch in evaluated if epoch > state.best_epoch)
        if waited < patience:
            return False
        logger.info(
            "early stop: no AP gain in %d evaluations since epoch %d (best AP %.4f; patience %d)",
            waited,
            state.best_epoch,
            state.best_ap,
            patience,
        )
        return True

    def _warn_if_ap_stuck_at_zero(self) -> None:
        message = None if self.warned_zero_ap else zero_ap_warning(self.state.history)
        if message:
            logger.warning(message)
            self.warned_zero_ap = True

    # ------------------------------------------------------------------------------------------ stage two

    def _enter_stage_two(self) -> None:
        """Reload the best stage-1 weights (model and EMA) and restart EMA: D-FINE's second training phase."""
        run, state = self.run, self.state
        dist_utils.barrier()  # rank 0 may still be writing best_stage1.pth
        path = run.output_dir / "best_stage1.pth"
        if path.is_file():
            checkpoint = load_checkpoint(path, map_location=run.device)
            run.model.load_state_dict(checkpoint["model"])
            if run.ema is not None and "ema" in checkpoint:
                run.ema.load_state_dict(checkpoint["ema"])
            logger.info(
                "stage 2 from epoch %d: reloaded %s (AP %.4f)", state.epoch, path, state.best_stage1_ap
            )
        else:
            logger.warning(
                "stage 2 from epoch %d: no %s (never evaluated in stage 1); keeping the current weights",
                state.epoch,
                path,
            )
        if run.ema is not None:
            run.ema.restart(run.ema_restart_decay)
        state.stage = 2
