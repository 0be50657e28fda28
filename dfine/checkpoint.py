"""Checkpoint files: atomic writes, safe loads, RNG state, and the checkpoint layouts D-FINE publishes.

Files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so
loading a checkpoint cannot run code. Everything :func:`capture_rng_state` returns stays within that.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import random
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dfine.distributed import unwrap_model

__all__ = [
    "CLASS_HEAD_PATTERNS",
    "CheckpointError",
    "FinetuneReport",
    "capture_rng_state",
    "class_map_from_names",
    "extract_model_state",
    "load_checkpoint",
    "load_weights_for_finetune",
    "load_weights_strict",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_atomic",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read or does not fit the model; the message says why and what to do."""


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk; not possible on every platform.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files that a killed :func:`save_atomic` left in ``folder``.

    A file whose PID is a live process (another writer on this host) is left alone, as is this process's.

    Returns:
        The files removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for candidate in folder.iterdir():
        found = _TEMPORARY.match(candidate.name)
        if found is None or not candidate.is_file():
            continue
        pid = int(found.group("pid"))
        if pid == os.getpid() or _process_alive(pid):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    if removed:
        logger.info("removed %d temporary file(s) of killed checkpoint writes in %s", len(removed), folder)
    return removed


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` so that ``path`` holds either the old file or the complete new one, never a partial one.

    The object is written to a temporary file in the same folder, flushed and fsynced, then renamed over
    ``path`` (atomic on POSIX and Windows), and the folder entry is fsynced. A crash at any point leaves the
    previous ``path`` intact; the temporary file is removed when the write fails with an exception, and the
    ones a killed process (kill -9) left behind are removed by the next write into that folder.

    Args:
        obj: what to save (keep it to tensors, numbers, strings and containers so it loads with weights_only).
        path: destination file; its folder is created if missing.

    Raises:
        CheckpointError: the disk is full (or over quota); ``path`` still holds the previous checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if _is_disk_full(error):
            kept = "it still holds the previous checkpoint" if path.is_file() else "it was not written"
            raise CheckpointError(
                f"no space left to write {path} ({error}); {kept}. Free disk space (or choose another "
                "--output-dir) and continue with -r auto"
            ) from error
        raise
    _fsync_directory(path.parent)


def _is_disk_full(error: BaseException) -> bool:
    # torch.save reports a failed write as a RuntimeError from its zip writer, with the OSError as its cause.
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "file write failed" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", cfg: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``, or a HuggingFace D-FINE folder.

    Args:
        path: the ``.pth`` file, or a folder with ``config.json`` + ``model.safetensors`` (converted in
            memory, with an output check, by ``dfine.hf.folder.checkpoint_from_hf_folder``).
        map_location: where tensors go (default CPU; move them after loading).
        cfg: the resolved config of the model the weights go into; needed for a folder.

    Returns:
        The saved mapping.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or corrupt, or it stores pickled Python objects that
            ``weights_only`` refuses (the message names the object and how to re-save the file).
    """
    path = Path(path)
    if path.is_dir() and cfg is not None:
        from dfine.hf.folder import checkpoint_from_hf_folder  # the [hf] extra, only for folders

        return checkpoint_from_hf_folder(path, cfg)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (resolved to {path.resolve()})")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSAFE_GLOBAL.search(str(error))
        if found is None:
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (corrupt file?): {error}"
            ) from error
        raise CheckpointError(
            f"{path} stores a pickled Python object ({found.group(1)}), which dfine refuses to load: "
            "it loads checkpoints with torch.load(weights_only=True) so that opening a file cannot run code. "
            'If you trust the file, re-save only its tensors, e.g. python -c "import torch; '
            "c = torch.load('IN', weights_only=False); torch.save({'model': c['model']}, 'OUT')\" "
            "and load OUT."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {str(error)[:200]}); "
            "use an earlier checkpoint (e.g. checkpointNNNN.pth) or re-download it"
        ) from error
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
        # What the unpickler trips over when the file is not a checkpoint at all (text, an image, HTML).
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint (it starts with {_first_bytes(path)!r}); "
            "pass the .pth file that dfine-train or the D-FINE release wrote"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors or states"
        )
    return dict(checkpoint)


def _first_bytes(path: Path, count: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(count)


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def extract_model_state(checkpoint: Mapping[str, Any], prefer_ema: bool = True) -> tuple[dict[str, Any], str]:
    """Find the model weights in any of the layouts in circulation.

    Accepted: ``{"ema": {"module": sd}}`` (the original's published files; preferred when ``prefer_ema``),
    ``{"model": sd}``, or a plain state dict. A ``module.`` prefix left by DDP is stripped.

    Args:
        checkpoint: what :func:`load_checkpoint` returned.
        prefer_ema: take the EMA weights when both EMA and model weights are present.

    Returns:
        ``(state_dict, source)`` with source ``"ema"``, ``"model"`` or ``"state_dict"``.

    Raises:
        CheckpointError: none of the layouts matches (the message lists the top-level keys).
    """
    ema = checkpoint.get("ema")
    has_ema = isinstance(ema, Mapping) and _is_state_dict(ema.get("module"))
    has_model = _is_state_dict(checkpoint.get("model"))
    if has_ema and (prefer_ema or not has_model):
        return _strip_prefix(ema["module"], "module."), "ema"
    if has_model:
        return _strip_prefix(checkpoint["model"], "module."), "model"
    if _is_state_dict(checkpoint):
        return _strip_prefix(checkpoint, "module."), "state_dict"
    raise CheckpointError(
        "no model weights found: expected {'ema': {'module': ...}}, {'model': ...} or a plain state dict; "
        f"the checkpoint's keys are {sorted(checkpoint)[:20]}"
    )


def capture_rng_state() -> dict[str, Any]:
    """Random-number-generator states of torch (CPU and every CUDA device), numpy and Python ``random``.

    Everything is a tensor, number, string or tuple, so it saves into a ``weights_only`` checkpoint.
    """
    numpy_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` returned (parts missing from ``state`` are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        saved = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": saved["bit_generator"],
                "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": int(saved["pos"])},
                "has_gauss": int(saved["has_gauss"]),
                "gauss": float(saved["gauss"]),
            }
        )
    if "python" in state:
        version, internal, gauss_next = state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        saved_cuda = list(state["cuda"])
        count = torch.cuda.device_count()
        if len(saved_cuda) != count:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine %d", len(saved_cuda), count
            )
        for index, device_state in enumerate(saved_cuda[:count]):
            torch.cuda.set_rng_state(device_state.cpu(), index)


# Tensors whose first dimension is the number of classes (D-FINE decoder): their rows follow the label order.
CLASS_HEAD_PATTERNS = (
    r"(^|\.)enc_score_head\.(weight|bias)$",
    r"(^|\.)dec_score_head\.\d+\.(weight|bias)$",
    r"(^|\.)denoising_class_embed\.weight$",
)


def _is_class_head(key: str) -> bool:
    return any(re.search(pattern, key) for pattern in CLASS_HEAD_PATTERNS)


def _as_state_dict(weights: Mapping[str, Any]) -> dict[str, Any]:
    return _strip_prefix(weights, "module.") if _is_state_dict(weights) else extract_model_state(weights)[0]


@dataclass
class FinetuneReport:
    """What :func:`load_weights_for_finetune` did with each tensor.

    Attributes:
        loaded: keys copied from the checkpoint unchanged.
        reinitialised: ``(key, rows_kept, rows)`` for class heads left at the model's initialisation, with
            ``rows_kept`` rows copied from the checkpoint through the class map.
        skipped: ``(key, checkpoint_shape, model_shape)`` for other shape mismatches (model init kept).
        missing: model keys absent from the checkpoint (model init kept).
        unexpected: checkpoint keys the model does not have (ignored).
    """

    loaded: list[str] = field(default_factory=list)
    reinitialised: list[tuple[str, int, int]] = field(default_factory=list)
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self, max_keys: int = 10) -> str:
        """Counts and the keys of every category but ``loaded``, for the start-up log."""
        lines = [
            f"loaded {len(self.loaded)} tensors, "
            f"re-initialised {len(self.reinitialised)} class-head tensors, "
            f"skipped {len(self.skipped)} (shape mismatch), missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}"
        ]
        entries = [
            ("re-initialised", [f"{k} (kept {kept}/{rows} rows)" for k, kept, rows in self.reinitialised]),
            ("skipped", [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.skipped]),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
        ]
        for title, keys in entries:
            if keys:
                lines.append(f"  {title}: " + _short_list(keys, max_keys))
        return "\n".join(lines)


def _short_list(items: list[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def class_map_from_names(model_names: list[str], checkpoint_names: list[str]) -> dict[int, int]:
    """Map model class indices to checkpoint class indices for the classes both name (case ignored).

    Args:
        model_names: class names of the new dataset, in label order (index = contiguous label).
        checkpoint_names: class names the checkpoint was trained on, in its label order.

    Returns:
        ``{model_label: checkpoint_label}`` for every shared name.
    """
    lookup = {name.strip().lower(): index for index, name in enumerate(checkpoint_names)}
    mapping = {i: lookup[n.strip().lower()] for i, n in enumerate(model_names) if n.strip().lower() in lookup}
    logger.info(
        "class map: %d of %d classes found in the checkpoint's classes", len(mapping), len(model_names)
    )
    return mapping


def _remap_rows(
    target: torch.Tensor, value: torch.Tensor, class_map: Mapping[int, int] | None, key: str
) -> tuple[torch.Tensor, int]:
    adapted = target.detach().clone()
    kept = 0
    for new_index, old_index in (class_map or {}).items():
        if not (0 <= new_index < target.shape[0] and 0 <= old_index < value.shape[0]):
            raise ValueError(
                f"class map entry {new_index} -> {old_index} is out of range for {key}: "
                f"model has {target.shape[0]} rows, checkpoint {value.shape[0]}"
            )
        adapted[new_index] = value[old_index]
        kept += 1
    return adapted, kept


def load_weights_for_finetune(
    model: nn.Module, weights: Mapping[str, Any], class_map: Mapping[int, int] | None = None
) -> FinetuneReport:
    """Load what fits from a checkpoint into a freshly built model (``-t/--tune``).

    Tensors with matching names and shapes are copied. Class heads (``enc_score_head``, ``dec_score_head.*``,
    ``denoising_class_embed``) whose class count differs keep the model's initialisation, except for the rows
    ``class_map`` names, which are copied from the checkpoint; with a ``class_map`` the heads are remapped
    even when the counts agree (e.g. a reordered label set). Any other mismatch keeps the model's value and is
    reported. Call it before wrapping the model in DDP and before building the EMA.

    Args:
        model: the model to fill (wrappers are unwrapped).
        weights: a state dict or a whole checkpoint (see :func:`extract_model_state`).
        class_map: ``{model_label: checkpoint_label}``, e.g. from :func:`class_map_from_names`.

    Returns:
        The report (also logged at INFO).
    """
    source = _as_state_dict(weights)
    module = unwrap_model(model)
    model_state = module.state_dict()
    report = FinetuneReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, target in model_state.items():
        if key not in source:
            report.missing.append(key)
            continue
        value = source[key]
        head_rows_differ = value.shape != target.shape or class_map is not None
        if _is_class_head(key) and head_rows_differ and value.shape[1:] == target.shape[1:]:
            to_load[key], kept = _remap_rows(target, value, class_map, key)
            report.reinitialised.append((key, kept, target.shape[0]))
        elif value.shape != target.shape:
            report.skipped.append((key, tuple(value.shape), tuple(target.shape)))
        else:
            to_load[key] = value
            report.loaded.append(key)
    report.unexpected = [key for key in source if key not in model_state]
    module.load_state_dict(to_load, strict=False)
    logger.info("fine-tuning weights: %s", report.summary())
    return report


def load_weights_strict(model: nn.Module, weights: Mapping[str, Any]) -> None:
    """Load every tensor of a checkpoint into the model, or explain exactly what differs.

    Args:
        model: the model (wrappers are unwrapped).
        weights: a state dict or a whole checkpoint (see :func:`extract_model_state`).

    Raises:
        CheckpointError: keys are missing or unexpected, or shapes differ; the message lists them and suggests
            ``-t`` when only the class heads differ (a checkpoint trained with another ``num_classes``).
    """
    source = _as_state_dict(weights)
    module = unwrap_model(model)
    expected = module.state_dict()
    missing = [k for k in expected if k not in source]
    unexpected = [k for k in source if k not in expected]
    mismatched = [k for k in expected if k in source and source[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {_short_list(missing, 10)}")
        if unexpected:
            problems.append(f"not in the model: {_short_list(unexpected, 10)}")
        if mismatched:
            shapes = [
                f"{k} (checkpoint {list(source[k].shape)} vs model {list(expected[k].shape)})"
                for k in mismatched
            ]
            problems.append(f"shape mismatch: {_short_list(shapes, 10)}")
        message = "checkpoint does not fit the model; " + "; ".join(problems)
        if not missing and not unexpected and all(_is_class_head(k) for k in mismatched):
            message += (
                f". Only the class heads differ (checkpoint {source[mismatched[0]].shape[0]} rows, model "
                f"{expected[mismatched[0]].shape[0]} in {mismatched[0]}): "
                "it was trained with another num_classes; "
                "to start from it with new class heads, pass it with -t/--tune instead of -r/--resume"
            )
        raise CheckpointError(message)
    module.load_state_dict(source, strict=True)
