"""What clusters do to a torchrun job, on CPU (gloo): SIGTERM to the agent, a worker killed and the group
restarted, and two "nodes" (two torchrun launches on this host) that train and resume together."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fault_drill import free_port, worker_pid
from trainer_helpers import CONFIG, tiny_overrides

from dfine.data.synthetic import ensure_quickstart

pytestmark = pytest.mark.dist


def _overrides(tmp_path: Path, epochs: int, train_images: int) -> list[str]:
    data_root = tmp_path / "data"
    ensure_quickstart(data_root, split="train", num_images=train_images)  # once, not by two ranks at a time
    ensure_quickstart(data_root, split="val", num_images=2)
    overrides = tiny_overrides(tmp_path / "run", data_root, epochs=epochs)
    return [*overrides, f"train_dataloader.dataset.num_images={train_images}", "device=cpu"]


def _launch(
    torchrun_args: list[str], overrides: list[str], log: Path, flags: tuple[str, ...] = (), **env: str
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "dfine.cli.train"]
    command += ["-c", str(CONFIG), *flags, "-u", *overrides]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    with open(log, "ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=environment)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _kill_job(process: subprocess.Popen[bytes]) -> None:
    """Kill torchrun and its workers (in sessions of their own, which a process-group kill would miss)."""
    doomed, queue = [], [process.pid]
    while queue:
        pid = queue.pop()
        doomed.append(pid)
        queue.extend(_children(pid))
    for pid in reversed(doomed):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def _wait_for(
    predicate: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: Path, timeout: int = 300
) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if process.poll() is not None or time.time() > deadline:
            _kill_job(process)
            pytest.fail(f"never saw {what}; torchrun output:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)


def _finish(process: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_job(process)
        pytest.fail(f"torchrun hung; output:\n{log.read_text()[-4000:]}")


def _in_log(path: Path, *parts: str) -> bool:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return any(all(part in line for part in parts) for line in text.splitlines())


def _worker_pid(agent: int, rank: int, timeout: float = 30) -> int:
    """The pid of the process under ``agent`` whose RANK is ``rank`` (torchrun starts workers as children)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pid = worker_pid(agent, rank)
        if pid is not None:
            return pid
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {agent}")


def test_sigterm_to_torchrun_stops_both_ranks_mid_epoch_with_last_pth_saved(tmp_path: Path) -> None:
    log, train_log = tmp_path / "torchrun.log", tmp_path / "run" / "train.log"
    overrides = _overrides(tmp_path, epochs=5, train_images=16)  # 8 steps per epoch per rank
    # torchrun signals each rank's process group: its loader worker gets SIGTERM too and must not crash it
    overrides += ["train_dataloader.num_workers=1"]
    agent = _launch(["--standalone", "--nproc-per-node=2"], overrides, log)
    _wait_for(lambda: _in_log(train_log, "epoch 1/", "step 1/"), "epoch 1 begin", agent, log)
    sent = time.time()
    agent.send_signal(signal.SIGTERM)
    _finish(agent, log, timeout=60)
    assert time.time() - sent < 30, "the job must be down within torchrun's 30 s grace period"
    output = log.read_text(errors="replace")
    assert output.count("preempted: stopped on SIGTERM") == 2, output[-4000:]  # each rank said so
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert saved["interrupted"]["epoch"] == 1 and saved["epoch"] == 1, "epoch 1 saved mid-way, to be redone"


def test_restarted_worker_group_resumes_instead_of_starting_over(tmp_path: Path) -> None:
    """The README's recipe: c10d rendezvous, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, --max-restarts; no -r."""
    log, train_log = tmp_path / "torchrun.log", tmp_path / "run" / "train.log"
    overrides = _overrides(tmp_path, epochs=3, train_images=8)
    rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=job"]
    agent = _launch(
        ["--nnodes=1", "--nproc-per-node=2", "--max-restarts=1", *rendezvous],
        overrides,
        log,
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
    )
    try:
        _wait_for(lambda: _in_log(train_log, "epoch 1/", "step 1/"), "epoch 1 begin", agent, log)
        os.kill(_worker_pid(agent.pid, 1), signal.SIGKILL)
    except BaseException:
        _kill_job(agent)  # no orphaned job after a failed test
        raise
    assert _finish(agent, log, timeout=300) == 0, log.read_text(errors="replace")[-4000:]
    assert _in_log(log, "torchrun restarted the workers") and _in_log(train_log, "resumed")
    saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert saved["epoch"] == 3 and [r["epoch"] for r in saved["history"]] == [0, 1, 2]


def test_two_nodes_on_one_host_train_evaluate_and_resume(tmp_path: Path) -> None:
    """Two torchrun launches, one per "node", meet at a c10d rendezvous; then both resume with -r auto."""
    train_log = tmp_path / "run" / "train.log"
    for epochs, flags in ((1, ()), (2, ("-r", "auto"))):
        overrides = _overrides(tmp_path, epochs=epochs, train_images=4)
        args = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-id=nodes{epochs}"]
        args.append(f"--rdzv-endpoint=127.0.0.1:{free_port()}")
        logs = [tmp_path / f"node{node}-{epochs}.log" for node in range(2)]
        nodes = [_launch(args, overrides, log, flags) for log in logs]
        codes = [_finish(node, log, timeout=300) for node, log in zip(nodes, logs, strict=True)]
        assert codes == [0, 0], "\n".join(log.read_text(errors="replace")[-3000:] for log in logs)
        saved = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
        assert saved["epoch"] == epochs and len(saved["history"]) == epochs
        assert "val_AP" in saved["history"][-1], "each epoch was evaluated"
        assert _in_log(logs[0], "of 2 (gloo)") and _in_log(logs[1], "of 2 (gloo)"), "one rank per launch"
    assert _in_log(train_log, "resumed")
