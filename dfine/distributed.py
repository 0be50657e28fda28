"""Everything the engine needs from ``torch.distributed``, in one place.

The same command runs unchanged as a single process or under ``torchrun``: :func:`init_distributed` reads
the variables torchrun exports (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)
and does nothing when they are absent. Every helper below degrades to the single-process answer when no
process group is initialised, so callers never branch on "am I distributed?".
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedContext",
    "all_gather_object",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "gather_rows",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "reduce_dict_for_logging",
    "setup_logging",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0..world_size-1.
        local_rank: rank on this node (selects the CUDA device).
        world_size: number of processes in the job.
        device: the device this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` when not distributed.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(requested: str | torch.device | None, local_rank: int) -> torch.device:
    if requested is None or str(requested) == "":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    # Under torchrun each process owns the GPU of its local rank; "cuda" alone would put every rank on GPU 0.
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(
    device: str | torch.device | None = None, timeout: timedelta = timedelta(minutes=30)
) -> DistributedContext:
    """Join the process group torchrun prepared, or run as a single process when not launched by torchrun.

    NCCL is used when this process computes on CUDA, gloo otherwise. Calling it again after the group exists
    returns the current context without re-initialising.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` ... ; ``None`` picks CUDA when available. Under torchrun a
            bare ``"cuda"`` becomes ``cuda:LOCAL_RANK``.
        timeout: how long collectives wait for the slowest rank before failing.

    Returns:
        The rank, local rank, world size, device and backend of this process.
    """
    launched = all(name in os.environ for name in _TORCHRUN_VARIABLES)
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0
    resolved = _resolve_device(device, local_rank)
    if not launched:
        return DistributedContext(0, 0, 1, resolved, None)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not is_distributed():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        logger.info("joined process group: rank %d of %d (%s)", get_rank(), get_world_size(), backend)
    return DistributedContext(get_rank(), local_rank, get_world_size(), resolved, dist.get_backend())


def is_distributed() -> bool:
    """True when a process group is initialised (so collectives are real)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0, the only rank that writes files and logs."""
    return get_rank() == 0


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank reaches this point (no-op in a single process)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks; returns a new tensor on the input's device (the input is not modified)."""
    if not is_distributed():
        return tensor.clone()
    reduced = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over ranks (e.g. "did any rank get a stop signal")."""
    if not is_distributed():
        return tensor.clone()
    reduced = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
    return reduced.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` (floating point) over ranks; returns a new tensor on the input's device."""
    return all_reduce_sum(tensor) / get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Gather one picklable object from every rank; returns ``[obj_rank0, obj_rank1, ...]`` on every rank."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_rows(tensor: torch.Tensor, dst: int = 0) -> list[torch.Tensor] | None:
    """Gather a tensor whose first dimension differs between ranks onto rank ``dst`` only.

    Unlike `all_gather_object` nothing is pickled and only ``dst`` receives: what an evaluation of 80k images
    x 300 detections needs (a few hundred MB of rows instead of tens of millions of Python objects on every
    rank).

    Args:
        tensor: [N_rank, ...] any dtype; the trailing dimensions must agree over ranks.

    Returns:
        On ``dst``: ``[tensor_rank0, tensor_rank1, ...]`` on the CPU; elsewhere None. Single process:
        ``[tensor]``.
    """
    if not is_distributed():
        return [tensor]
    device = _collective_device()
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(get_world_size())]
    dist.all_gather(counts, count)
    longest = max(int(c) for c in counts)
    padded = tensor.to(device).contiguous()
    if padded.shape[0] < longest:  # gather needs equal shapes
        padded = torch.cat([padded, padded.new_zeros((longest - padded.shape[0], *padded.shape[1:]))])
    if get_rank() != dst:
        dist.gather(padded, None, dst=dst)
        return None
    received = [torch.empty_like(padded) for _ in counts]
    dist.gather(padded, received, dst=dst)
    return [part[: int(c)].cpu() for part, c in zip(received, counts, strict=True)]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (what the other ranks pass is ignored)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=_collective_device())
    return holder[0]


def reduce_dict_for_logging(values: Mapping[str, torch.Tensor | float]) -> dict[str, float]:
    """Average scalar values (e.g. the loss terms) over ranks for logging, in one collective.

    Every rank must pass the same keys: the values are stacked in sorted-key order, so a rank with an extra
    key would misalign the others. Gradients are not involved; the inputs are detached.

    Args:
        values: name -> 0-d tensor or float.

    Returns:
        name -> float averaged over ranks (the plain values in a single process).
    """
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack(
        [torch.as_tensor(values[key], dtype=torch.float32).detach().reshape(()).cpu() for key in keys]
    )  # [K]
    if is_distributed():
        stacked = all_reduce_mean(stacked.to(_collective_device())).cpu()
    return {key: float(value) for key, value in zip(keys, stacked.tolist(), strict=True)}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers (they prefix state-dict keys)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def cleanup() -> None:
    """Leave the process group (safe to call when none exists or twice)."""
    if is_distributed():
        dist.destroy_process_group()


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


_HANDLER_MARK = "_dfine_handler"


def setup_logging(output_dir: str | Path | None, rank: int | None = None, level: int = logging.INFO) -> None:
    """Configure the ``dfine`` logger: console and ``output_dir/train.log`` on rank 0 only.

    Other ranks get a single stderr handler at ERROR level, tagged with their rank, so a failure on rank 3 is
    not silent while routine messages are not repeated once per process. Nothing is patched (``print`` stays
    ``print``). Calling it again replaces the handlers it added before. Records still propagate to the root
    logger (so pytest's caplog sees them); do not also give the root logger a console handler.

    Args:
        output_dir: folder for ``train.log``; ``None`` logs to the console only. Created if missing (rank 0).
        rank: this process's rank; ``None`` asks :func:`get_rank`.
        level: level for rank 0's handlers.
    """
    rank = get_rank() if rank is None else rank
    package_logger = logging.getLogger("dfine")
    for handler in [h for h in package_logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        package_logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = []
    if rank == 0:
        package_logger.setLevel(level)
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(formatter)
        handlers.append(console)
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            log_file = logging.FileHandler(Path(output_dir) / "train.log", encoding="utf-8")
            log_file.setFormatter(formatter)
            handlers.append(log_file)
    else:
        package_logger.setLevel(logging.ERROR)
        errors = logging.StreamHandler(sys.stderr)
        errors.addFilter(_RankFilter(rank))
        errors.setFormatter(logging.Formatter("[rank %(rank)d] %(levelname)s %(name)s: %(message)s"))
        handlers.append(errors)
    for handler in handlers:
        setattr(handler, _HANDLER_MARK, True)
        package_logger.addHandler(handler)
