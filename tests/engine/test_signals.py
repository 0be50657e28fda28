"""SIGTERM / SIGUSR1 (preemption): stop after the step, save last.pth as Ctrl-C does, exit 75, resume."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from trainer_helpers import CONFIG, tiny_config, tiny_overrides

from dfine.cli import train as train_cli
from dfine.engine.setup import build_training
from dfine.engine.signals import EXIT_PREEMPTED, StopRequested, StopSignals
from dfine.engine.step import TrainStep
from dfine.engine.trainer import Trainer


@pytest.fixture(autouse=True)
def _drop_dfine_log_handlers():  # type: ignore[no-untyped-def]
    """The run's console handler writes to this test's captured stdout, closed after it: remove it then."""
    yield
    package_logger = logging.getLogger("dfine")
    for handler in [h for h in package_logger.handlers if getattr(h, "_dfine_handler", False)]:
        package_logger.removeHandler(handler)
        handler.close()


def _signal_at_step(monkeypatch: pytest.MonkeyPatch, signum: int, at_call: int) -> None:
    """Send ``signum`` to this process during the ``at_call``-th training step (0-based, over the run)."""
    original = TrainStep.__call__
    calls = {"n": 0}

    def stepping(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if calls["n"] == at_call:
            os.kill(os.getpid(), signum)
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", stepping)


def test_sigterm_mid_epoch_saves_the_rewound_epoch_and_resume_redoes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_root = tmp_path / "data"
    cfg = tiny_config(tmp_path / "run", data_root, epochs=3)
    _signal_at_step(monkeypatch, signal.SIGTERM, at_call=2)  # the first step of epoch 1 (2 steps per epoch)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StopRequested, match="SIGTERM"):
        Trainer(build_training(cfg)).fit()
    assert signal.getsignal(signal.SIGTERM) is previous, "the trainer must restore the handler it replaced"
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert saved["epoch"] == 1, "epoch 1 was interrupted: it must count as not done"
    assert saved["interrupted"] == {"epoch": 1, "global_step": 3}
    assert saved["global_step"] == 2, "the step counter rewinds to the start of the interrupted epoch"
    monkeypatch.undo()
    resumed = Trainer(build_training(cfg, resume="auto"))
    assert resumed.state.epoch == 1 and resumed.state.global_step == 2
    resumed.fit()
    final = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert final["epoch"] == 3 and final["global_step"] == 6 and "interrupted" not in final


def test_sigusr1_through_the_cli_exits_75_with_last_pth_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = tiny_overrides(tmp_path / "run", tmp_path / "data", epochs=2)
    _signal_at_step(monkeypatch, signal.SIGUSR1, at_call=1)
    code = train_cli.main(["-c", str(CONFIG), "-u", *overrides])
    assert code == EXIT_PREEMPTED == 75
    err = capsys.readouterr().err
    assert "SIGUSR1" in err and "-r auto" in err and "Traceback" not in err
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert saved["interrupted"]["epoch"] == 0 and saved["epoch"] == 0


def test_stop_signals_restore_handlers_and_only_record() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        assert not signals.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)  # recorded, not fatal
        assert signals.stop_requested() and signals.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_signal_at_the_end_of_training_an_epoch_saves_it_and_skips_its_evaluation(tmp_path: Path) -> None:
    run = build_training(tiny_config(tmp_path / "run", tmp_path / "data", epochs=3))
    end_of_epoch = run.lr_schedule.epoch_step

    def signalled_epoch_step() -> None:  # runs after an epoch's last step, before its evaluation
        end_of_epoch()
        os.kill(os.getpid(), signal.SIGTERM)

    run.lr_schedule.epoch_step = signalled_epoch_step
    with pytest.raises(StopRequested):
        Trainer(run).fit()
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert saved["epoch"] == 1 and "interrupted" not in saved, "the trained epoch counts as done"
    assert "val_AP" not in saved["history"][0] and not (tmp_path / "run" / "eval.json").exists()
