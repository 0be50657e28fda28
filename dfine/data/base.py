"""What every detection dataset shares: a compact annotation table, loading, sanitising, the target contract.

Each format (COCO JSON, YOLO txt, Pascal VOC XML, the synthetic quickstart set) only parses its files into an
`AnnotationTable`; loading an image, turning its annotations into targets, the dataset check and the COCO
ground truth for evaluation are the same code for all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import convert_bounding_box_format

from dfine.config.registry import ConfigError
from dfine.data.epoch import SharedEpoch, WorkerReseeder
from dfine.data.image_io import load_image, try_read_image_size
from dfine.data.label_map import LabelMap
from dfine.data.sample_failures import SampleFailures, TooManyFailedSamplesError
from dfine.ops.box_ops import box_xyxy_to_cxcywh

__all__ = ["AnnotationTable", "DetectionDataset", "Target", "boxes_for_image"]

_MAX_REPLACEMENTS = 16  # neighbours tried after a sample fails to load


class Target(TypedDict, total=False):
    """Per-image target handed to the model and the criterion (after the transforms and the collate function).

    Keys:
        labels: int64 [N], contiguous 0..C-1 (see `LabelMap`).
        boxes: float32 [N, 4], cx, cy, w, h normalised to 0..1 by the network input size.
        image_id: int64 scalar, the annotation file's image id.
        orig_size: int64 [2], (w, h) of the upright image as loaded, before any transform.
        letterbox_size: float32 [2], only after a ``keep_ratio`` Resize: (w, h) of the network input measured
            in original-image pixels; multiply normalised boxes by it (instead of ``orig_size``) to get
            original-image pixels.
    """

    labels: Tensor
    boxes: Tensor
    image_id: Tensor
    orig_size: Tensor
    letterbox_size: Tensor


@dataclass
class AnnotationTable:
    """All images and boxes of a dataset in flat numpy arrays (cheap to fork into many loader workers).

    Image ``i`` owns annotation rows ``offsets[i]:offsets[i + 1]``.

    Attributes:
        image_ids: int64 [I] ids as in the annotation file, in dataset order.
        file_names: bytes [I] image paths (UTF-8), relative to the image folder or absolute.
        declared_sizes: int64 [I, 2] (w, h) written in the annotation file, -1 where it gives none.
        offsets: int64 [I + 1].
        boxes_xywh: float32 [A, 4] x, y of the top-left corner, width, height, in pixels.
        category_ids: int64 [A] ids as in the annotation file.
        iscrowd: bool [A].
        areas: float32 [A] the file's ``area`` (COCO: the segment's area), box area where it gives none.
        annotation_ids: int64 [A].
        cache_path: the annotation cache the arrays are memory-mapped from (`dfine.data.annotation_cache`), or
            None for arrays in memory. A mapped table pickles as this path, so spawned loader workers map
            the same pages instead of receiving a copy.
    """

    image_ids: np.ndarray
    file_names: np.ndarray
    declared_sizes: np.ndarray
    offsets: np.ndarray
    boxes_xywh: np.ndarray
    category_ids: np.ndarray
    iscrowd: np.ndarray
    areas: np.ndarray
    annotation_ids: np.ndarray
    cache_path: str | None = None

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.cache_path is None:
            return super().__reduce_ex__(protocol)
        from dfine.data.annotation_cache import map_cached  # that module imports this one

        return map_cached, (self.cache_path,)

    @classmethod
    def from_lists(
        cls,
        images: Sequence[tuple[int, str, int, int]],
        annotations: Sequence[Sequence[tuple[float, float, float, float, int, bool, float, int]]],
    ) -> AnnotationTable:
        """Build from Python lists.

        Args:
            images: ``(image_id, file_name, width, height)`` per image (-1 for an unknown size).
            annotations: per image, ``(x, y, w, h, category_id, iscrowd, area, annotation_id)`` rows.
        """
        counts = np.array([len(rows) for rows in annotations], dtype=np.int64)
        rows = [row for per_image in annotations for row in per_image]
        array = np.array(rows, dtype=np.float64).reshape(-1, 8)
        return cls(
            image_ids=np.array([image[0] for image in images], dtype=np.int64),
            file_names=np.array([image[1].encode() for image in images], dtype=np.bytes_),
            declared_sizes=np.array([image[2:4] for image in images], dtype=np.int64).reshape(-1, 2),
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            boxes_xywh=array[:, :4].astype(np.float32),
            category_ids=array[:, 4].astype(np.int64),
            iscrowd=array[:, 5].astype(bool),
            areas=array[:, 6].astype(np.float32),
            annotation_ids=array[:, 7].astype(np.int64),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_annotations(self) -> int:
        return len(self.category_ids)

    def rows(self, index: int) -> slice:
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))

    def file_name(self, index: int) -> str:
        return self.file_names[index].decode()


def boxes_for_image(
    table: AnnotationTable, index: int, width: int, height: int, label_map: LabelMap
) -> tuple[np.ndarray, np.ndarray]:
    """Training boxes of image ``index``: crowd boxes and unknown categories left out, the rest clipped.

    Args:
        width, height: upright image size in pixels (as loaded).

    Returns:
        boxes_xyxy: float32 [N, 4] x1, y1, x2, y2 in pixels, inside the image, positive width and height.
        labels: int64 [N] contiguous labels.
    """
    rows = table.rows(index)
    xywh = table.boxes_xywh[rows]
    category_ids = table.category_ids[rows]
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    labels = label_map.labels_for(category_ids)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & ~table.iscrowd[rows] & (labels >= 0)
    return boxes[keep].astype(np.float32), labels[keep]


class DetectionDataset(Dataset):
    """Base of all detection datasets: ``dataset[i] -> (image, target)`` after the transforms.

    Subclasses parse their format in ``__init__`` and call `_setup`. Items are ``(image, target)``; without
    transforms the image is an RGB PIL image and ``target["boxes"]`` a ``tv_tensors.BoundingBoxes`` in xyxy
    pixels. After the transforms, the image is float32 [3, H, W] in 0..1 and boxes are cxcywh normalised to
    0..1 (converted here when the pipeline has no ``ConvertBoxes``), as in `Target`.
    """

    table: AnnotationTable
    label_map: LabelMap
    img_folder: str
    source: str

    def _setup(
        self,
        table: AnnotationTable,
        label_map: LabelMap,
        img_folder: str | os.PathLike,
        source: str,
        transforms: Callable[..., Any] | Mapping[str, Any] | None,
        num_classes: int | None,
        max_failed_fraction: float = 0.01,
    ) -> None:
        if not 0 <= max_failed_fraction <= 1:
            raise ConfigError(
                f"{source}: max_failed_fraction must be in 0..1 (e.g. 0.01), got {max_failed_fraction}."
            )
        if isinstance(transforms, Mapping):
            from dfine.data.compose import build_transforms  # compose imports this module's finalize_sample

            transforms = build_transforms(transforms, where=f"{source}: transforms")
        self.table = table
        self.label_map = label_map
        self.img_folder = os.fspath(img_folder)
        self.source = source
        self.transforms = transforms
        self._epoch = SharedEpoch()
        self.max_failed_fraction = max_failed_fraction
        self.failures = SampleFailures()
        self.reseeder = WorkerReseeder()
        label_map.check_num_classes(num_classes)

    def __len__(self) -> int:
        return len(self.table)

    # -- epoch / seeding -------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Set the training epoch the stop-epoch policy and `Mosaic` read (seen by all loader workers)."""
        self._epoch.set(epoch)
        self.failures.reset()
        if hasattr(self.transforms, "set_epoch"):
            self.transforms.set_epoch(epoch)

    # -- label map -------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.label_map.num_classes

    def category_to_label(self, category_id: int) -> int:
        return self.label_map.category_to_label(category_id)

    def label_to_category(self, label: int) -> int:
        return self.label_map.label_to_category(label)

    # -- loading ---------------------------------------------------------------------------------------------
    def image_path(self, index: int) -> str:
        return os.path.join(self.img_folder, self.table.file_name(index))

    def load_item(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        """Image ``index`` and its target before any transform (xyxy pixel boxes of the upright image)."""
        image = load_image(self.image_path(index))
        width, height = image.size
        boxes, labels = boxes_for_image(self.table, index, width, height, self.label_map)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(labels),
            "image_id": torch.tensor(int(self.table.image_ids[index]), dtype=torch.int64),
            "orig_size": torch.tensor([width, height], dtype=torch.int64),
        }
        return image, target

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        epoch = self.epoch
        self.reseeder(epoch)
        image, target = self.load_or_replace(index)
        if self.transforms is not None:
            image, target = self.transforms(image, target, dataset=self, epoch=epoch)
            image, target = finalize_sample(image, target)
        return image, target

    @property
    def failed_samples(self) -> int:
        """Samples that failed to load since the last `set_epoch` (all loader workers together)."""
        return self.failures.total()

    def load_or_replace(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        """`load_item`, or when the file cannot be read the next loadable sample (counted, see
        `SampleFailures`): a deterministic neighbour keeps the epoch reproducible."""
        for attempt in range(_MAX_REPLACEMENTS + 1):
            candidate = (index + attempt) % len(self)
            try:
                return self.load_item(candidate)
            except OSError as error:  # missing (FileNotFoundError) or undecodable (UnreadableImageError)
                allowed = self.max_failed_fraction * len(self)
                self.failures.record(self.image_path(candidate), error, allowed, len(self))
        raise TooManyFailedSamplesError(
            f"{_MAX_REPLACEMENTS + 1} samples in a row from {self.image_path(index)} failed to load; check "
            "the image folder (dfine-train --check-data lists broken files)."
        )

    # -- evaluation ------------------------------------------------------------------------------------------
    def to_coco_dict(self) -> dict[str, Any]:
        """Ground truth in COCO format (original category ids), for the evaluator and format conversion."""
        table = self.table
        images = []
        for index in range(len(table)):
            width, height = (int(v) for v in table.declared_sizes[index])
            if width <= 0 or height <= 0:
                width, height = try_read_image_size(self.image_path(index)) or (-1, -1)
            images.append(
                {
                    "id": int(table.image_ids[index]),
                    "file_name": table.file_name(index),
                    "width": width,
                    "height": height,
                }
            )
        annotations = []
        for index in range(len(table)):
            image_id = int(table.image_ids[index])
            for row in range(*table.rows(index).indices(table.num_annotations)):
                annotations.append(
                    {
                        "id": int(table.annotation_ids[row]),
                        "image_id": image_id,
                        "category_id": int(table.category_ids[row]),
                        "bbox": [float(v) for v in table.boxes_xywh[row]],
                        "area": float(table.areas[row]),
                        "iscrowd": int(table.iscrowd[row]),
                    }
                )
        return {
            "images": images,
            "annotations": annotations,
            "categories": self.label_map.to_coco_categories(),
        }

    def extra_repr(self) -> str:
        return f"{len(self)} images from {self.source}, {self.num_classes} classes"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def finalize_sample(image: Any, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    """Bring a transformed sample to the model contract whatever the pipeline ended with.

    The image becomes float32 [3, H, W] in 0..1; boxes still held as ``BoundingBoxes`` (no ``ConvertBoxes`` in
    the pipeline, as in the original's validation configs) become cxcywh normalised by their canvas.
    """
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    if image.dtype == torch.uint8:
        image = image.float().div_(255.0)
    image = image.as_subclass(Tensor)
    boxes = target.get("boxes")
    if isinstance(boxes, tv_tensors.BoundingBoxes):
        height, width = boxes.canvas_size
        cxcywh = box_xyxy_to_cxcywh(_to_xyxy(boxes))  # [N, 4] pixels
        target["boxes"] = cxcywh / torch.tensor([width, height, width, height], dtype=cxcywh.dtype)
    elif isinstance(boxes, Tensor):
        target["boxes"] = boxes.as_subclass(Tensor)
    return image, target


def _to_xyxy(boxes: tv_tensors.BoundingBoxes) -> Tensor:
    converted = convert_bounding_box_format(boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
    return converted.as_subclass(Tensor).float().reshape(-1, 4)
