"""Check an exported ONNX file against PyTorch in onnxruntime, and time it.

See :mod:`dfine.deploy.onnx_export` for the graph's inputs and outputs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfine.deploy.onnx_export import DETECTION_OUTPUTS, IMAGE_INPUT, SIZE_INPUT, make_session

__all__ = [
    "LatencyStats",
    "ParityResult",
    "benchmark_onnx",
    "benchmark_runtimes",
    "check_onnx_parity",
    "repeat_to_batch",
]


@dataclass
class ParityResult:
    """How closely onnxruntime reproduced PyTorch on one batch.

    Attributes:
        batch_size: B of the batch checked.
        tolerance: the largest accepted difference.
        max_difference: per float output (``boxes``, ``scores`` or ``pred_logits``, ``pred_boxes``), the
            largest absolute difference over matched detections (boxes as a fraction of the image size).
        mismatched: detections (or queries) with no counterpart of the same label within ``tolerance``:
            labels are compared exactly, so any count above 0 fails.
        reordered: detections matched at another position (near-tied scores ranked differently).
        at_cutoff: detections present in only one output whose score ties the last kept score (top-k cut).
    """

    batch_size: int
    tolerance: float
    max_difference: dict[str, float] = field(default_factory=dict)
    mismatched: int = 0
    reordered: int = 0
    at_cutoff: int = 0

    @property
    def passed(self) -> bool:
        return self.mismatched == 0 and all(value <= self.tolerance for value in self.max_difference.values())

    def summary(self) -> str:
        """One line, e.g. ``batch 2: boxes 1.5e-05, scores 4.2e-07, labels exact -> ok``."""
        values = ", ".join(f"{name} {value:.2e}" for name, value in self.max_difference.items())
        labels = "labels exact" if self.mismatched == 0 else f"{self.mismatched} detections unmatched"
        notes = []
        if self.reordered:
            notes.append(f"{self.reordered} near-tied reordered")
        if self.at_cutoff:
            notes.append(f"{self.at_cutoff} swapped at the top-k cut-off")
        extra = f" ({'; '.join(notes)})" if notes else ""
        verdict = "ok" if self.passed else f"ABOVE TOLERANCE {self.tolerance:g}"
        return f"batch {self.batch_size}: {values}, {labels}{extra} -> {verdict}"


def repeat_to_batch(images: Tensor, sizes: Tensor | None, batch_size: int) -> tuple[Tensor, Tensor | None]:
    """Cycle through sample images (and their sizes) until there are ``batch_size`` of them.

    Args:
        images: [N, 3, H, W]; sizes: [N, 2] or None.

    Returns:
        ``images [batch_size, 3, H, W]`` and ``sizes [batch_size, 2]`` (or None).
    """
    index = torch.arange(batch_size) % images.shape[0]
    return images[index], None if sizes is None else sizes[index]


def _box_scale(sizes: np.ndarray) -> np.ndarray:
    """[B, 1, 4] (w, h, w, h): pixel boxes divided by it are fractions of the image."""
    return np.tile(sizes.astype(np.float64), 2)[:, None, :]


def _match_image(
    ours: tuple[np.ndarray, np.ndarray, np.ndarray],
    reference: tuple[np.ndarray, np.ndarray, np.ndarray],
    tolerance: float,
) -> tuple[list[tuple[int, int]], int, int]:
    """Pair the detections of one image: ``(pairs, unmatched, at_cutoff)``.

    Each output is ``(labels [K], boxes [K, 4] (fractions of the image), scores [K])``, best first. A
    detection can match only one of the same label whose score is within ``tolerance`` (differences larger
    than that fail anyway); among those the position-aligned one is preferred, else the closest box.
    """
    labels_a, boxes_a, scores_a = ours
    labels_b, boxes_b, scores_b = reference
    free = np.ones(len(labels_b), dtype=bool)
    pairs, unmatched, at_cutoff = [], 0, 0
    for i in range(len(labels_a)):
        candidates = free & (labels_b == labels_a[i]) & (np.abs(scores_b - scores_a[i]) <= tolerance)
        if not candidates.any():
            # Only in our top-k: fine if it ties the reference's last score (the other one fell out there).
            if len(scores_b) and abs(scores_a[i] - scores_b[-1]) <= tolerance:
                at_cutoff += 1
            else:
                unmatched += 1
            continue
        distance = np.abs(boxes_b - boxes_a[i]).max(axis=-1)
        aligned = i < len(free) and candidates[i] and distance[i] <= tolerance
        j = i if aligned else int(np.where(candidates, distance, np.inf).argmin())
        free[j] = False
        pairs.append((i, j))
    return pairs, unmatched, at_cutoff


def _compare_detections(
    ours: list[np.ndarray], reference: list[np.ndarray], sizes: np.ndarray, tolerance: float
):
    labels_a, boxes_a, scores_a = ours
    labels_b, boxes_b, scores_b = reference
    scale = _box_scale(sizes)
    boxes_a, boxes_b = boxes_a / scale, boxes_b / scale
    result = {"boxes": 0.0, "scores": 0.0}
    unmatched = reordered = at_cutoff = 0
    for image in range(labels_a.shape[0]):
        aligned = (
            np.array_equal(labels_a[image], labels_b[image])
            and np.abs(scores_a[image] - scores_b[image]).max(initial=0) <= tolerance
            and np.abs(boxes_a[image] - boxes_b[image]).max(initial=0) <= tolerance
        )
        if aligned:
            index_a = index_b = np.arange(labels_a.shape[1])
        else:
            pairs, missing, cut = _match_image(
                (labels_a[image], boxes_a[image], scores_a[image]),
                (labels_b[image], boxes_b[image], scores_b[image]),
                tolerance,
            )
            unmatched, at_cutoff = unmatched + missing, at_cutoff + cut
            if missing:  # report the position-wise difference, which shows how far off the outputs are
                pairs = [(k, k) for k in range(labels_a.shape[1])]
            reordered += sum(i != j for i, j in pairs)
            index_a = np.array([i for i, _ in pairs], dtype=np.int64)
            index_b = np.array([j for _, j in pairs], dtype=np.int64)
        box_difference = np.abs(boxes_a[image][index_a] - boxes_b[image][index_b]).max(initial=0)
        score_difference = np.abs(scores_a[image][index_a] - scores_b[image][index_b]).max(initial=0)
        result["boxes"] = max(result["boxes"], float(box_difference))
        result["scores"] = max(result["scores"], float(score_difference))
    return result, unmatched, reordered, at_cutoff


def _compare_raw(ours: list[np.ndarray], reference: list[np.ndarray], tolerance: float):
    """Position-wise, or through a query permutation when the encoder's top-k ranked near-ties differently."""
    result = {"pred_logits": 0.0, "pred_boxes": 0.0}
    unmatched = reordered = 0
    for image in range(ours[0].shape[0]):
        rows_a = np.concatenate([ours[0][image], ours[1][image]], axis=-1)  # [Q, C + 4]
        rows_b = np.concatenate([reference[0][image], reference[1][image]], axis=-1)
        order = np.arange(rows_a.shape[0])
        if np.abs(rows_a - rows_b).max(initial=0) > tolerance:
            distance = np.abs(rows_a[:, None, :] - rows_b[None, :, :]).max(axis=-1)  # [Q, Q]
            nearest = distance.argmin(axis=1)
            is_permutation = len(np.unique(nearest)) == len(nearest)
            if is_permutation and distance[order, nearest].max() <= tolerance:
                order, reordered = nearest, reordered + int((nearest != np.arange(len(nearest))).sum())
            else:
                unmatched += int((distance.min(axis=1) > tolerance).sum())
        for k, name in enumerate(result):
            difference = np.abs(ours[k][image] - reference[k][image][order]).max(initial=0)
            result[name] = max(result[name], float(difference))
    return result, unmatched, reordered, 0


def check_onnx_parity(
    path: str | Path,
    reference: nn.Module,
    images: Tensor,
    orig_target_sizes: Tensor | None = None,
    *,
    tolerance: float = 1e-4,
    session: Any = None,
) -> ParityResult:
    """Run the ONNX file in onnxruntime and PyTorch's ``reference`` on the same batch and compare.

    Labels must agree exactly; boxes (as fractions of the original image's width and height, so one tolerance
    fits every image size) and scores (0..1) within ``tolerance``. Top-k selection is discontinuous: two
    detections whose scores differ by less than the numerical noise can come out in either order, and the
    last kept detection can swap with the first dropped one. So where the outputs do not agree position by
    position, each ONNX detection is matched to a not-yet-matched PyTorch detection of the same label whose
    score is within ``tolerance`` (preferring the same position, else the closest box); such swaps are counted
    in ``reordered`` / ``at_cutoff`` instead of failing the check. A detection with no such partner is counted
    in ``mismatched`` and the reported differences are then the position-wise ones. Raw outputs (no
    post-processing) are compared query by query, or through a query permutation for the same reason.

    Args:
        path: the ONNX file written by :func:`dfine.deploy.onnx_export.export_onnx`.
        reference: the PyTorch module it was exported from
            (an :class:`~dfine.deploy.onnx_export.ExportableDetector`).
        images: [B, 3, H, W] float32 in 0..1.
        orig_target_sizes: [B, 2] (width, height) in pixels, given to both as int64; None for raw outputs.
        tolerance: the largest accepted difference.
        session: an onnxruntime session of ``path`` to reuse (default: a new CPU session).

    Returns:
        The :class:`ParityResult`; its ``passed`` says whether everything is within ``tolerance``.
    """
    session = session or make_session(path)
    feed = {IMAGE_INPUT: images.detach().cpu().float().numpy()}
    names = [entry.name for entry in session.get_inputs()]
    if SIZE_INPUT in names:
        if orig_target_sizes is None:
            raise ValueError(f"{path} has post-processing: pass orig_target_sizes [B, 2] (width, height)")
        orig_target_sizes = orig_target_sizes.detach().round().to(device=images.device, dtype=torch.int64)
        feed[SIZE_INPUT] = orig_target_sizes.cpu().numpy()
    ours = session.run(None, feed)
    with torch.no_grad():
        expected = reference(images, orig_target_sizes) if SIZE_INPUT in names else reference(images)
    expected = [tensor.detach().cpu().numpy() for tensor in expected]
    output_names = [entry.name for entry in session.get_outputs()]
    if output_names == list(DETECTION_OUTPUTS):
        compared = _compare_detections(ours, expected, feed[SIZE_INPUT], tolerance)
    else:
        compared = _compare_raw(ours, expected, tolerance)
    difference, unmatched, reordered, at_cutoff = compared
    return ParityResult(images.shape[0], tolerance, difference, unmatched, reordered, at_cutoff)


# Consecutive timed calls of one runtime before the next runtime's turn (see _time_interleaved).
TIMING_BLOCK = 5


@dataclass
class LatencyStats:
    """Wall-clock latency of one call, in milliseconds, over ``iterations`` timed calls after warm-up."""

    mean_ms: float
    median_ms: float
    p90_ms: float
    iterations: int
    batch_size: int

    def summary(self) -> str:
        return (
            f"median {self.median_ms:.1f} ms, mean {self.mean_ms:.1f} ms, p90 {self.p90_ms:.1f} ms "
            f"(batch {self.batch_size}, {self.iterations} runs)"
        )


def _stats(times: list[float], batch_size: int) -> LatencyStats:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return LatencyStats(statistics.fmean(times), statistics.median(times), p90, len(times), batch_size)


def _time_interleaved(
    calls: Mapping[str, Callable[[], Any]], warmup: int, iterations: int, batch_size: int
) -> dict[str, LatencyStats]:
    """Time the calls in turn, in short blocks, so a load change on a shared machine hits all alike.

    Each block starts with an untimed call: the runtime before it has just evicted this one's weights from the
    CPU caches, a cost a model serving alone does not pay (alternating single calls put the INT8 quickstart
    model at 0.63x of fp32 instead of 0.59x in blocks).
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for first in range(0, iterations, TIMING_BLOCK):
        for name, call in calls.items():
            call()
            for _ in range(min(TIMING_BLOCK, iterations - first)):
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _stats(values, batch_size) for name, values in times.items()}


def benchmark_onnx(
    path: str | Path,
    feed: Mapping[str, np.ndarray],
    *,
    preprocess: Callable[[], Mapping[str, np.ndarray]] | None = None,
    postprocess: Callable[[list[np.ndarray]], Any] | None = None,
    warmup: int = 3,
    iterations: int = 20,
    num_threads: int | None = None,
    session: Any = None,
) -> dict[str, LatencyStats]:
    """Latency of the ONNX file in onnxruntime: the model alone and end to end.

    Args:
        path: the ONNX file.
        feed: prepared inputs (``images`` [B, 3, H, W] float32, and ``orig_target_sizes`` [B, 2] int64 when
            the graph has post-processing) for the model-only timing.
        preprocess: builds a feed from raw data (e.g. reads and resizes images); timed end to end.
        postprocess: turns the session's outputs into final detections (e.g. a score threshold); timed end
            to end.
        warmup, iterations: untimed and timed calls of each kind (in turn, in short blocks: see
            :func:`benchmark_runtimes`).
        num_threads: onnxruntime intra-op threads (default: all cores).
        session: a session to reuse (its thread setting wins over ``num_threads``).

    Returns:
        ``{"model": ...}``: ``session.run`` on ``feed`` (in-graph post-processing included); and with
        ``preprocess`` or ``postprocess``, ``"end_to_end"``: preprocess + ``session.run`` + postprocess.
    """
    session = session or make_session(path, num_threads=num_threads)
    batch_size = int(feed[IMAGE_INPUT].shape[0])
    calls: dict[str, Callable[[], Any]] = {"model": lambda: session.run(None, dict(feed))}
    if preprocess is not None or postprocess is not None:

        def end_to_end() -> Any:
            outputs = session.run(None, dict(preprocess() if preprocess is not None else feed))
            return postprocess(outputs) if postprocess is not None else outputs

        calls["end_to_end"] = end_to_end
    return _time_interleaved(calls, warmup, iterations, batch_size)


def benchmark_runtimes(
    calls: Mapping[str, Callable[[], Any]], batch_size: int, warmup: int = 3, iterations: int = 20
) -> dict[str, LatencyStats]:
    """Latency of several runtimes on the same batch, timed in turn.

    Each runtime's turn is an untimed call then up to :data:`TIMING_BLOCK` timed ones, so a load change on a
    shared machine hits all alike while each is timed with its weights in the CPU caches, as when serving.

    Args:
        calls: ``{"PyTorch": ..., "onnxruntime": ..., "OpenVINO": ...}``, each running the model once.
        batch_size: images per call (for the per-image figure).
        warmup, iterations: untimed and timed calls of each (besides one untimed call per turn).

    Returns:
        ``{name: LatencyStats}`` in the order of ``calls``.
    """
    return _time_interleaved(calls, warmup, iterations, batch_size)
