"""The epoch loop on a tiny quickstart config (CPU): progress output for terminals and for log files, and
the warning for a val AP stuck at zero.

Stage two, resume and checkpoints: test_run_state.py; the step itself: test_step.py; building the run
(-t, freezing, AMP): test_setup.py; what a run writes for a person: test_training_outputs.py.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from trainer_helpers import tiny_config

from dfine.engine.health import zero_ap_warning
from dfine.engine.run_log import EpochProgress
from dfine.engine.setup import build_training
from dfine.engine.trainer import Trainer


def test_an_epoch_logged_to_a_file_has_plain_progress_lines_and_no_bar_frames(
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    trainer = Trainer(build_training(tiny_config(tmp_path, data_root, epochs=1)))  # print_freq=1
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="dfine.engine.run_log"):
        trainer.train_one_epoch(0)  # stderr is pytest's capture here: not a terminal, as under SLURM
    trainer.evaluate()  # the evaluation loop too draws no bar into a log file
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out, "a tqdm frame reached the log"
    lines = [r.getMessage() for r in caplog.records if r.name == "dfine.engine.run_log"]
    assert [line.split(":")[0] for line in lines] == ["epoch 0/0 step 1/2", "epoch 0/0 step 2/2"]
    for line in lines:
        for part in ("loss ", "lr ", "img/s ", "eta 0:"):
            assert part in line, (part, line)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal_and_every_print_freq_th_line_elsewhere(
    caplog: pytest.LogCaptureFixture,
) -> None:
    terminal = _Terminal()
    with caplog.at_level(logging.INFO, logger="dfine.engine.run_log"):
        progress = EpochProgress(range(4), epoch=2, epochs=10, print_freq=2, stream=terminal)
        for index in progress:
            progress.update(index, loss=1.5, lr=1e-4, images_per_s=8.0)
        progress.close()
    assert "\r" in terminal.getvalue() and "epoch 2/9" in terminal.getvalue()
    assert not caplog.records, "a terminal gets the bar, not log lines"

    log_file = io.StringIO()
    with caplog.at_level(logging.INFO, logger="dfine.engine.run_log"):
        progress = EpochProgress(range(5), epoch=2, epochs=10, print_freq=2, stream=log_file)
        for index in progress:
            progress.update(index, loss=1.5, lr=1e-4, images_per_s=8.0)
        progress.close()
    assert log_file.getvalue() == ""
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["epoch 2/9 step 2/5", "epoch 2/9 step 4/5"]
    assert "loss 1.5 lr 1.00e-04 img/s 8.0 eta 0:00:0" in lines[0]

    quiet = io.StringIO()  # ranks other than 0
    caplog.clear()
    progress = EpochProgress(range(3), epoch=0, epochs=1, print_freq=1, enabled=False, stream=quiet)
    for index in progress:
        progress.update(index, loss=1.0, lr=1e-4, images_per_s=1.0)
    progress.close()
    assert quiet.getvalue() == "" and not caplog.records


def test_falling_loss_with_val_ap_stuck_at_zero_warns_once_naming_the_usual_causes(
    data_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert zero_ap_warning([{"loss": 3.0, "val_AP": 0.0}, {"loss": 2.0, "val_AP": 0.0}]) is None  # too early
    rising = [{"loss": 1.0 + i, "val_AP": 0.0} for i in range(4)]
    assert zero_ap_warning(rising) is None
    learning = [{"loss": 4.0 - i, "val_AP": 0.0 if i < 3 else 0.01} for i in range(4)]
    assert zero_ap_warning(learning) is None
    trainer = Trainer(build_training(tiny_config(tmp_path, data_root)))
    trainer.state.history = [{"loss": 4.0 - i, "val_AP": 0.0} for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="dfine.engine.trainer"):
        trainer._warn_if_ap_stuck_at_zero()
        trainer.state.history.append({"loss": 0.5, "val_AP": 0.0})
        trainer._warn_if_ap_stuck_at_zero()
    warnings = [r.getMessage() for r in caplog.records if "val AP is 0" in r.getMessage()]
    assert len(warnings) == 1, warnings
    for cause in ("label map", "cxcywh", "num_classes"):
        assert cause in warnings[0]
