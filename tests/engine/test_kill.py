"""kill -9 at seeded random moments, half of them inside a (slowed) checkpoint write: last.pth always loads,
``-r auto`` always continues from it, and the temporary files of killed writes are cleaned up."""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import time
import traceback
from pathlib import Path

import pytest
from trainer_helpers import tiny_config

import dfine.checkpoint
from dfine.checkpoint import load_checkpoint
from dfine.engine.setup import TrainingRun, build_training
from dfine.engine.trainer import Trainer

KILLS = 20
WRITE_CHUNKS, CHUNK_PAUSE_S = 8, 0.02  # a checkpoint write takes >= 0.16 s: room to land a kill inside it


@pytest.fixture(autouse=True)
def _drop_dfine_log_handlers():  # type: ignore[no-untyped-def]
    """The run's console handler writes to this test's captured stdout, closed after it: remove it then."""
    yield
    package_logger = logging.getLogger("dfine")
    for handler in [h for h in package_logger.handlers if getattr(h, "_dfine_handler", False)]:
        package_logger.removeHandler(handler)
        handler.close()


def _slow_save(writes: Path, marker: Path):  # type: ignore[no-untyped-def]
    """torch.save writing in pauses; ``marker`` exists during a write, ``writes`` grows by one per write."""
    real_save = dfine.checkpoint.torch.save

    def save(obj, handle):  # type: ignore[no-untyped-def]
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        marker.touch()
        with open(writes, "ab") as counter:
            counter.write(b".")
        step = len(data) // WRITE_CHUNKS + 1
        for start in range(0, len(data), step):
            handle.write(data[start : start + step])
            handle.flush()
            time.sleep(CHUNK_PAUSE_S)
        marker.unlink(missing_ok=True)

    return save


def _start_training(run: TrainingRun, writes: Path, marker: Path) -> int:
    """Fork a child that does what ``dfine-train -r auto`` does after building, and trains until killed.

    The parent built the run once; each child resumes it from ``last.pth`` (weights, optimizer, schedule,
    counters, RNG), so a restart costs a fork instead of a model build.
    """
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        dfine.checkpoint.torch.save = _slow_save(writes, marker)  # the child's copy of the module only
        run.checkpoints.resume("auto")
        Trainer(run).fit()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def test_kill_9_at_random_moments_never_loses_last_pth(tmp_path: Path) -> None:
    data_root = tmp_path / "data"
    overrides = ("eval_interval=1000", "checkpoint_freq=1")  # no evaluation; last.pth + checkpointNNNN.pth
    run = build_training(tiny_config(tmp_path / "run", data_root, *overrides, epochs=1000))
    writes, marker, last = tmp_path / "writes", tmp_path / "writing", tmp_path / "run" / "last.pth"
    rng = random.Random(15)
    epochs_seen, inside_writes = [], 0
    for kill in range(KILLS):
        marker.unlink(missing_ok=True)
        writes.write_bytes(b"")
        pid = _start_training(run, writes, marker)
        if kill % 2 == 1:  # (the last kill too) wait for write 1 or 2 to begin, then kill part-way in
            wanted, deadline = rng.randint(1, 2), time.time() + 120
            while not (marker.exists() and len(writes.read_bytes()) >= wanted) and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, WRITE_CHUNKS * CHUNK_PAUSE_S * 0.7))
        else:
            time.sleep(rng.uniform(0.0, 2.0))
        inside_writes += marker.exists()
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"kill {kill}: the training ended by itself (status {status})"
        if last.exists():
            checkpoint = load_checkpoint(last)  # raises if a kill left a partial file
            epochs_seen.append(int(checkpoint["epoch"]))
    print(f"{KILLS} kills, {inside_writes} inside a checkpoint write; epochs: {epochs_seen}")
    assert inside_writes >= KILLS // 2 - 2, f"only {inside_writes} kills landed inside a checkpoint write"
    assert epochs_seen == sorted(epochs_seen) and epochs_seen[-1] >= 3, epochs_seen
    leftovers = list((tmp_path / "run").glob(".*.tmp-*"))
    assert leftovers, "the kills inside writes should have left temporary files for the cleanup to remove"

    saved_epoch = epochs_seen[-1]
    cfg = tiny_config(tmp_path / "run", data_root, *overrides, epochs=saved_epoch + 1)
    trainer = Trainer(build_training(cfg, resume="auto"))  # what the user runs: a fresh process's -r auto
    assert trainer.state.epoch == saved_epoch, "-r auto must continue from the newest last.pth"
    trainer.fit()
    assert load_checkpoint(last)["epoch"] == saved_epoch + 1
    leftovers = list((tmp_path / "run").glob(".*.tmp-*"))
    assert leftovers == [], "the next write must remove the temporary files of the killed writes"
