"""The dataset check: find what would break or silently spoil training before the first step.

Documented outcomes (one summary line per kind, with a few examples):

=========================================  ========  =========================================================
finding                                    severity  what training does
=========================================  ========  =========================================================
missing image file                         error     (would stop with FileNotFoundError naming the file)
unreadable image (not an image)            error     (would stop with UnreadableImageError naming the file)
truncated JPEG/PNG (no end marker;         warning   loads with the missing part grey
``decode``: any truncation)
box partly outside the image               warning   clipped to the image
box entirely outside the image             warning   dropped
box with zero or negative width/height     warning   dropped
unknown category id                        warning   box dropped
image size differs from the annotation     warning   the file's upright (EXIF-applied) size is used
annotation of an image not in the file     warning   skipped
crowd boxes, images without boxes          info      crowd boxes are not trained on; empty images are kept
=========================================  ========  =========================================================

``check_dataset(dataset).ok`` is False only when there are errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from dfine.data.base import DetectionDataset
from dfine.data.image_checks import PROBLEMS, check_images

__all__ = ["DatasetReport", "Finding", "check_dataset", "existing_files"]

logger = logging.getLogger(__name__)

# Boxes overshooting the image by less than this (pixels) are rounding noise: clipped without a warning.
_OUTSIDE_TOLERANCE = 1.0
_MAX_EXAMPLES = 5


@dataclass
class Finding:
    """One kind of problem: how many, a few examples, and what training does about it."""

    kind: str
    severity: Literal["error", "warning", "info"]
    outcome: str
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str, count: int = 1) -> None:
        self.count += count
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(example)

    def line(self) -> str:
        shown = f" (e.g. {'; '.join(self.examples)})" if self.examples else ""
        return f"{self.severity.upper()}: {self.count} {self.kind}: {self.outcome}{shown}"


@dataclass
class DatasetReport:
    """Result of `check_dataset`: ``ok`` (no errors) and a printable summary."""

    source: str
    num_images: int
    num_annotations: int
    num_classes: int
    findings: dict[str, Finding] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.count and f.severity == "error" for f in self.findings.values())

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.count and f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings.values() if f.count and f.severity == "warning"]

    def count(self, kind: str) -> int:
        return self.findings[kind].count if kind in self.findings else 0

    def summary_lines(self) -> list[str]:
        """One header line, then one line per kind found (errors first)."""
        lines = [
            f"{self.source}: {self.num_images} images, {self.num_annotations} boxes, "
            f"{self.num_classes} classes -> {'OK' if self.ok else 'NOT OK'}"
        ]
        order = {"error": 0, "warning": 1, "info": 2}
        for finding in sorted(self.findings.values(), key=lambda f: order[f.severity]):
            if finding.count:
                lines.append("  " + finding.line())
        return lines

    def log(self) -> None:
        for line in self.summary_lines():
            logger.log(logging.ERROR if not self.ok else logging.INFO, line)


_KINDS = {
    "missing": (
        "error",
        "missing image files",
        "training would stop at them; fix img_folder or the file names",
    ),
    "unreadable": ("error", "unreadable images", "training would stop at them; replace or remove them"),
    "truncated": ("warning", "truncated images", "they load with the missing part grey"),
    "outside": ("warning", "boxes partly outside the image", "clipped to the image"),
    "beyond": ("warning", "boxes entirely outside the image", "dropped"),
    "degenerate": ("warning", "boxes with zero or negative width/height", "dropped"),
    "unknown_category": ("warning", "boxes with a category id not in 'categories'", "dropped"),
    "size_mismatch": (
        "warning",
        "images whose size differs from the annotation file",
        "the file's size is used",
    ),
    "orphans": ("warning", "annotations of image ids not in 'images'", "skipped"),
    "crowd": ("info", "crowd boxes", "kept for evaluation, not trained on"),
    "empty": ("info", "images without boxes", "kept (they teach the model what is background)"),
}


def check_dataset(
    dataset: DetectionDataset,
    *,
    images: Literal["none", "exists", "header", "decode"] = "header",
    num_threads: int = 8,
) -> DatasetReport:
    """Check annotations and image files of ``dataset`` (see the module docstring for the outcomes).

    Args:
        dataset: any dataset built on `DetectionDataset` (COCO, YOLO, VOC, quickstart).
        images: how far to look at image files: ``none`` (annotations only, declared sizes), ``exists``,
            ``header`` (default: read each file's upright size and look for the JPEG/PNG end marker, which
            names truncated files), ``decode`` (decode every pixel: slow on large sets). ``header`` and
            ``decode`` results are kept beside the annotation cache per (path, size, mtime): a later check
            reads only the files that changed.
        num_threads: threads reading files.

    Returns:
        The report; ``report.ok`` is False when training would stop on a missing or unreadable file.
    """
    if not isinstance(dataset, DetectionDataset):
        raise TypeError(f"check_dataset needs a dfine detection dataset, got {type(dataset).__name__}.")
    table = dataset.table
    report = DatasetReport(dataset.source, len(table), table.num_annotations, dataset.num_classes)
    report.findings = {
        key: Finding(kind, severity, outcome) for key, (severity, kind, outcome) in _KINDS.items()
    }
    orphans = int(getattr(dataset, "orphan_annotations", 0))
    if orphans:
        report.findings["orphans"].add(f"{orphans} in {dataset.source}", orphans)

    sizes = _image_sizes(dataset, images, num_threads, report)
    _check_annotations(dataset, sizes, report)
    return report


def existing_files(paths: Sequence[str], num_threads: int = 8) -> list[bool]:
    """Which of ``paths`` are files, reading each folder's listing once instead of one stat per file.

    Objects365's 1.7M images sit in a few dozen folders: a few dozen listings take seconds where 1.7M
    ``isfile`` calls take minutes. A folder that cannot be listed falls back to ``isfile`` per path; an entry
    that is listed but is not a regular file (a folder, a dangling link) counts as missing.
    """
    by_folder: dict[str, list[int]] = {}
    for index, path in enumerate(paths):
        by_folder.setdefault(os.path.dirname(path), []).append(index)

    def listing(folder: str) -> dict[str, bool] | None:
        try:
            with os.scandir(folder or ".") as entries:
                return {entry.name: entry.is_file() for entry in entries}
        except OSError:
            return None

    found = [False] * len(paths)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        listings = dict(zip(by_folder, pool.map(listing, by_folder), strict=True))
        for folder, indices in by_folder.items():
            names = listings[folder]
            if names is None:
                for index, ok in zip(
                    indices, pool.map(os.path.isfile, [paths[i] for i in indices]), strict=True
                ):
                    found[index] = ok
                continue
            for index in indices:
                found[index] = names.get(os.path.basename(paths[index]), False)
    return found


def _image_sizes(
    dataset: DetectionDataset, mode: str, num_threads: int, report: DatasetReport
) -> list[tuple[int, int] | None]:
    """Upright (w, h) per image as the check should use it; None where unknown or unreadable."""
    table = dataset.table
    declared = [(int(w), int(h)) if w > 0 and h > 0 else None for w, h in table.declared_sizes]
    if mode == "none":
        return declared
    if mode not in ("exists", "header", "decode"):
        raise ValueError(f"images must be one of none, exists, header, decode; got {mode!r}.")

    paths = [dataset.image_path(index) for index in range(len(table))]
    if mode == "exists":
        found = existing_files(paths, num_threads)
        results = [(None, declared[i]) if ok else ("missing", None) for i, ok in enumerate(found)]
    else:
        remember, identity = None, ""
        if table.cache_path is not None:  # kept beside the annotation cache, valid for this version of it
            stat = os.stat(table.cache_path)
            remember = f"{table.cache_path}.{mode}-checks.npz"
            identity = f"{os.path.abspath(dataset.img_folder)}|{stat.st_size}|{stat.st_mtime_ns}"
        problems, found_sizes, read = check_images(paths, mode, num_threads, remember, identity)
        logger.info("%s: %d image files read, %d results reused", dataset.source, read, len(paths) - read)
        results = [
            (PROBLEMS[p], (int(w), int(h)) if w > 0 else None)
            for p, (w, h) in zip(problems.tolist(), found_sizes, strict=True)
        ]

    sizes: list[tuple[int, int] | None] = []
    for index, (problem, size) in enumerate(results):
        path = paths[index]
        if problem is not None:
            report.findings[problem].add(path)
        if size is not None and declared[index] is not None and size != declared[index]:
            hint = " (sides swapped: EXIF rotation)" if size == declared[index][::-1] else ""
            report.findings["size_mismatch"].add(
                f"{path}: file {size[0]}x{size[1]}, annotation "
                f"{declared[index][0]}x{declared[index][1]}{hint}"
            )
        sizes.append(size if problem != "missing" else None)
    return sizes


def _check_annotations(
    dataset: DetectionDataset, sizes: list[tuple[int, int] | None], report: DatasetReport
) -> None:
    """All boxes at once: each row is checked against its image's (upright) size."""
    table = dataset.table
    counts = np.diff(table.offsets)
    for index in np.flatnonzero(counts == 0):
        report.findings["empty"].add(table.file_name(int(index)))
    image_of_row = np.repeat(np.arange(len(table)), counts)
    size_array = np.array([s if s is not None else (-1, -1) for s in sizes], dtype=np.float64).reshape(-1, 2)
    width, height = size_array[image_of_row].T
    x, y, w, h = table.boxes_xywh.astype(np.float64).T
    labels = dataset.label_map.labels_for(table.category_ids)

    degenerate = (w <= 0) | (h <= 0) | ~np.isfinite(table.boxes_xywh).all(axis=1)
    known_size = width > 0
    valid = ~degenerate & known_size
    beyond = valid & ((x >= width) | (y >= height) | (x + w <= 0) | (y + h <= 0))
    tol = _OUTSIDE_TOLERANCE
    outside = valid & ~beyond & ((x < -tol) | (y < -tol) | (x + w > width + tol) | (y + h > height + tol))

    def describe(row: int) -> str:
        image = int(image_of_row[row])
        size = f" ({int(width[row])}x{int(height[row])})" if width[row] > 0 else ""
        return (
            f"image {int(table.image_ids[image])}{size} annotation {int(table.annotation_ids[row])} "
            f"bbox {[round(float(v), 1) for v in table.boxes_xywh[row]]}"
        )

    _add(report, "crowd", table.iscrowd, describe)
    _add(report, "degenerate", degenerate, describe)
    unknown = (labels < 0) & ~degenerate
    _add(
        report,
        "unknown_category",
        unknown,
        lambda row: f"{describe(row)} category_id {table.category_ids[row]}",
    )
    _add(report, "beyond", beyond, describe)
    _add(report, "outside", outside, describe)


def _add(report: DatasetReport, key: str, mask: np.ndarray, describe: Callable[[int], str]) -> None:
    rows = np.flatnonzero(mask)
    if not len(rows):
        return
    finding = report.findings[key]
    finding.count += len(rows)
    finding.examples.extend(describe(int(row)) for row in rows[: _MAX_EXAMPLES - len(finding.examples)])
