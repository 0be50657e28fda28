"""``loggers: [tensorboard, mlflow, wandb]`` through `RunLog`, each read back from its local store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dfine.config.registry import ConfigError
from dfine.engine.loggers import check_loggers, flatten_config
from dfine.engine.run_log import RunLog

CFG = {"epochs": 2, "model": {"decoder": {"num_layers": 3}}, "loggers": ["tensorboard", "mlflow"]}


def _log_a_run(output_dir: Path, loggers: list[str]) -> None:
    """Two steps, one epoch, one picture; then best.pth and a plot exist when the log closes."""
    run_log = RunLog(output_dir, loggers=loggers, cfg=CFG)
    run_log.step(1, {"loss_vfl": 0.5, "loss_bbox": 0.25}, [1e-4], 10.0)
    run_log.step(2, {"loss_vfl": 0.4, "loss_bbox": 0.2}, [2e-4], 11.0)
    run_log.epoch({"epoch": 0, "loss": 0.6, "val_AP": 0.125})
    run_log.images("val_predictions", [torch.zeros(3, 8, 8, dtype=torch.uint8)], 0)
    torch.save({"model": {}}, output_dir / "best.pth")
    Image.new("RGB", (4, 4)).save(output_dir / "results.png")
    run_log.close()


def test_mlflow_gets_params_step_and_epoch_metrics_and_artefacts(tmp_path: Path, monkeypatch) -> None:
    mlflow = pytest.importorskip("mlflow", reason='mlflow is not installed (pip install -e ".[mlflow]")')
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_a_run(tmp_path, ["tensorboard", "mlflow"])
    assert list((tmp_path / "summary").glob("events.out.tfevents.*"))  # TensorBoard still written
    client = mlflow.tracking.MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("dfine")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model.decoder.num_layers"] == "3"
    assert run.data.params["loggers"] == "['tensorboard', 'mlflow']"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 4)) for m in losses] == [(1, 0.75), (2, 0.6)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/AP")] == [(0, 0.125)]
    artefacts = {entry.path for entry in client.list_artifacts(run.info.run_id)}
    assert {"best.pth", "results.png", "val_predictions"} <= artefacts
    assert run.info.status == "FINISHED"


def test_wandb_offline_run_holds_config_metrics_and_model(tmp_path: Path, monkeypatch) -> None:
    wandb = pytest.importorskip("wandb", reason='wandb is not installed (pip install -e ".[wandb]")')
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged, artefacts = [], []
    run_class = wandb.sdk.wandb_run.Run
    log, log_artifact = run_class.log, run_class.log_artifact
    monkeypatch.setattr(
        run_class, "log", lambda self, data, *a, **k: (logged.extend(data), log(self, data, *a, **k))
    )
    monkeypatch.setattr(
        run_class,
        "log_artifact",
        lambda self, art, *a, **k: (artefacts.append(art), log_artifact(self, art, *a, **k)),
    )
    _log_a_run(tmp_path, ["wandb"])
    assert {"train/loss", "global_step", "val/AP", "epoch", "val_predictions/0", "plots/results"} <= set(
        logged
    )
    assert [art.type for art in artefacts] == ["model"] and "best.pth" in artefacts[0].manifest.entries
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # `wandb sync` uploads this file later; its protobuf records keep keys and JSON values as plain bytes
    (records,) = run_dir.glob("run-*.wandb")
    data = records.read_bytes()
    for expected in (b"model.decoder.num_layers", b"train/loss", b"global_step", b"val/AP", b"0.125"):
        assert expected in data, expected
    assert not (tmp_path / "summary").exists()  # TensorBoard only when listed


def test_unknown_or_missing_logger_fails_in_one_line(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'mlflow'"):
        check_loggers(["mlflw"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r'pip install "dfine\[wandb\]"'):
        RunLog("unused", loggers=["tensorboard", "wandb"])
    assert check_loggers(None) == ["tensorboard"]


def test_flatten_config_joins_nested_keys() -> None:
    flat = flatten_config({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None})
    assert flat == {"a.b.c": "1", "a.d": "[1, 2]", "e": "None"}
