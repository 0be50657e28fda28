"""Experiment trackers behind one writer: ``loggers: [tensorboard, mlflow, wandb]`` (TensorBoard by default).

`RunLog` writes through :func:`open_loggers`'s :class:`LoggerGroup`, which offers the two calls it makes of a
TensorBoard ``SummaryWriter`` (``add_scalar``, ``add_image``) plus ``flush`` and ``close`` and hands each to
every configured tracker. Scalars tagged ``train/*`` and ``lr/*`` are per step, the others per epoch.

- MLflow: the resolved config flattened into params (``model.decoder.num_layers`` ...), every scalar as a
  metric at its step, images as artefacts, and at the end ``best.pth`` and the run's PNG plots as artefacts;
  to ``$MLFLOW_TRACKING_URI``, else a local file store ``output_dir/mlruns`` (``mlflow ui --backend-store-uri
  output_dir/mlruns``). Experiment ``$MLFLOW_EXPERIMENT_NAME``, else ``dfine``.
- W&B: the same (config as ``wandb.config``, per-step metrics against ``global_step``, per-epoch ones against
  ``epoch``, best checkpoint as a ``model`` artefact); ``WANDB_MODE=offline`` logs under ``output_dir/wandb``
  without an account. Project ``$WANDB_PROJECT``, else ``dfine``.

``mlflow`` (or ``mlflow-skinny``) and ``wandb`` are optional extras, imported only when listed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from dfine.config.registry import ConfigError, did_you_mean

__all__ = ["KNOWN_LOGGERS", "LoggerGroup", "check_loggers", "flatten_config", "open_loggers"]

logger = logging.getLogger(__name__)

KNOWN_LOGGERS = ("tensorboard", "mlflow", "wandb")
_INSTALL = {"mlflow": 'pip install "dfine[mlflow]"', "wandb": 'pip install "dfine[wandb]"'}
_STEP_GROUPS = ("train/", "lr/")


def check_loggers(names: Sequence[str] | None) -> list[str]:
    """The ``loggers`` setting checked: known names, their packages importable; default ``[tensorboard]``.

    Raises:
        ConfigError: an unknown name (with a did-you-mean), or a tracker whose package is missing (one line
            with the install command).
    """
    names = ["tensorboard"] if names is None else [str(name).lower() for name in names]
    for name in names:
        if name not in KNOWN_LOGGERS:
            hint = did_you_mean(name, KNOWN_LOGGERS)
            raise ConfigError(f"loggers: unknown logger {name!r} (known: {', '.join(KNOWN_LOGGERS)}).{hint}")
        if name in _INSTALL:
            try:
                __import__(name)
            except ImportError as error:
                raise ConfigError(
                    f"loggers: {name} is not installed: {_INSTALL[name]} (or remove {name} from loggers)"
                ) from error
    return names


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model.decoder.num_layers": "6", ...}``: nested dicts joined by dots, lists and values as text."""
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = str(value)
    return flat


def _is_step_tag(tag: str) -> bool:
    return tag.startswith(_STEP_GROUPS)


class _TensorBoard:
    def __init__(self, summary_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when logging

        self.writer = SummaryWriter(str(summary_dir))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="CHW")

    def flush(self) -> None:
        self.writer.flush()

    def close(self, artifacts: Sequence[Path]) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, output_dir: Path, params: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # mlflow-skinny has no database backend; MLflow 3 keeps the file store but refuses it unless asked
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (output_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dfine")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=output_dir.name).info.run_id
        from mlflow.entities import Param

        items = [Param(key[:250], value[:6000]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        logger.info("MLflow: run %s in %s (experiment %s)", self.run_id, uri, name)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.client.log_metric(self.run_id, tag, float(value), step=int(step))

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        self.client.log_image(self.run_id, image.permute(1, 2, 0).numpy(), f"{tag}/epoch_{step:04d}.png")

    def flush(self) -> None:
        pass

    def close(self, artifacts: Sequence[Path]) -> None:
        for path in artifacts:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, output_dir: Path, params: Mapping[str, str]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dfine"),
            name=output_dir.name,
            dir=str(output_dir),
            config=dict(params),
        )
        self.run.define_metric("global_step")
        self.run.define_metric("epoch")
        for group in _STEP_GROUPS:
            self.run.define_metric(f"{group}*", step_metric="global_step")
        for group in ("val/*", "epoch/*"):
            self.run.define_metric(group, step_metric="epoch")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: float(value), "global_step" if _is_step_tag(tag) else "epoch": int(step)})

    def add_image(self, tag: str, image: Tensor, step: int) -> None:
        self.run.log({tag: self.wandb.Image(image.permute(1, 2, 0).numpy()), "epoch": int(step)})

    def flush(self) -> None:
        pass

    def close(self, artifacts: Sequence[Path]) -> None:
        try:
            checkpoints = [path for path in artifacts if path.suffix == ".pth"]
            if checkpoints:
                artifact = self.wandb.Artifact(f"{self.run.name or 'dfine'}-model", type="model")
                for path in checkpoints:
                    artifact.add_file(str(path))
                self.run.log_artifact(artifact)
            for path in artifacts:
                if path.suffix == ".png":
                    self.run.log({f"plots/{path.stem}": self.wandb.Image(str(path))})
        finally:
            self.run.finish()


class LoggerGroup:
    """The configured trackers, written to as one TensorBoard-like writer.

    Args:
        trackers: opened trackers (see :func:`open_loggers`).
        output_dir: the run folder, where ``close`` finds ``best.pth`` and the ``*.png`` plots.
    """

    def __init__(self, trackers: Mapping[str, Any], output_dir: Path) -> None:
        self.trackers = dict(trackers)
        self.output_dir = output_dir

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for tracker in self.trackers.values():
            tracker.add_scalar(tag, value, step)

    def add_image(self, tag: str, image: Tensor, step: int, dataformats: str = "CHW") -> None:
        """uint8 [3, H, W] picture (``dataformats`` as TensorBoard's; only CHW is used)."""
        for tracker in self.trackers.values():
            tracker.add_image(tag, image, step)

    def flush(self) -> None:
        for tracker in self.trackers.values():
            tracker.flush()

    def close(self) -> None:
        """End every tracker; MLflow and W&B upload ``best.pth`` and the run's plots first."""
        artifacts = [path for path in [self.output_dir / "best.pth"] if path.is_file()]
        artifacts += sorted(self.output_dir.glob("*.png"))
        for name, tracker in self.trackers.items():
            try:
                tracker.close(artifacts)
            except Exception as error:  # an upload failure must not hide how training ended
                logger.warning("%s: closing failed (%s: %s)", name, type(error).__name__, error)


def open_loggers(
    names: Sequence[str] | None, output_dir: str | Path, summary_dir: str | Path, cfg: Mapping[str, Any]
) -> LoggerGroup:
    """Open the trackers ``names`` lists (see :func:`check_loggers`) for a run.

    Args:
        names: the config's ``loggers`` (None: TensorBoard only).
        output_dir: the run folder (MLflow's local store, W&B's files, the artefacts at the end).
        summary_dir: TensorBoard's folder.
        cfg: the resolved config, logged as flattened params.
    """
    output_dir = Path(output_dir)
    params = flatten_config(cfg)
    trackers: dict[str, Any] = {}
    for name in check_loggers(names):
        if name == "tensorboard":
            trackers[name] = _TensorBoard(Path(summary_dir))
        elif name == "mlflow":
            trackers[name] = _MLflow(output_dir, params)
        else:
            trackers[name] = _Wandb(output_dir, params)
    return LoggerGroup(trackers, output_dir)
