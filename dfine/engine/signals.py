"""Preemption: SIGTERM and SIGUSR1 become a request to stop after the current step, agreed by every rank.

A cluster that takes the machine back (SLURM, Kubernetes, spot instances) sends SIGTERM and waits a grace
period before SIGKILL; SLURM's ``--signal=USR1@120`` sends SIGUSR1 that long before the end of the time
limit. The handler only records the signal: the trainer asks :meth:`StopSignals.stop_requested` after each
step, every rank joins one all-reduce so all stop at the same step (under torchrun the agent forwards
the signal to each worker, but not always at the same instant), rank 0 saves ``last.pth`` as a Ctrl-C does,
and the process exits with :data:`EXIT_PREEMPTED`.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import torch

from dfine import distributed as dist_utils

__all__ = ["EXIT_PREEMPTED", "STOP_SIGNALS", "StopRequested", "StopSignals"]

logger = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "try again later". Distinct from a crash (1), a user error (2), Ctrl-C (130)
# and a kill by the signal itself (143 for SIGTERM), so a requeue script can tell "saved, resume me".
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequested(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after saving ``last.pth``; the CLI exits with EXIT_PREEMPTED."""

    def __init__(self, signal_name: str, checkpoint: str) -> None:
        super().__init__(
            f"stopped on {signal_name}: saved {checkpoint}; continue with the same command plus -r auto"
        )
        self.signal_name = signal_name


class StopSignals:
    """Record SIGTERM/SIGUSR1 while training runs; restore the previous handlers afterwards.

    Use as a context manager around the epoch loop. Outside the main thread (where Python cannot install
    handlers) it does nothing, and :meth:`stop_requested` still agrees with the other ranks.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        # Logging inside a signal handler may deadlock on the handler's lock; the trainer logs instead.

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a stop request"

    def stop_requested(self) -> bool:
        """True on every rank when any rank has received a stop signal (one tiny all-reduce per call)."""
        flag = 0 if self.received is None else int(self.received)
        if dist_utils.is_distributed():
            flag = int(dist_utils.all_reduce_max(torch.tensor([flag], dtype=torch.int64)).item())
        if flag and self.received is None:
            self.received = flag  # another rank's signal: report the same name everywhere
        return flag != 0
