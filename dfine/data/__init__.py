"""Datasets, transforms, batching and data loaders.

Importing this package registers the dataset types (``CocoDetection``, ``YoloDetection``, ``VOCDetection``,
``QuickstartDetection``), the transforms (the original D-FINE names plus ``Mosaic``) and
``BatchImageCollateFunction``. What the CLI and the trainer call:

- `build_dataloader` (a ``train_dataloader`` / ``val_dataloader`` block -> loader with ``set_epoch``),
- `check_dataset` (-> `DatasetReport` with ``ok`` and ``summary_lines()``),
- ``loader.dataset.label_map`` (`LabelMap`: labels <-> category ids and names, stored in checkpoints).
"""

from __future__ import annotations

from dfine.data import mosaic as _mosaic  # noqa: F401  (registers Mosaic)
from dfine.data.base import AnnotationTable, DetectionDataset, Target
from dfine.data.check import DatasetReport, Finding, check_dataset
from dfine.data.coco import CocoDetection
from dfine.data.collate import BatchImageCollateFunction, multi_scale_sizes
from dfine.data.compose import Compose, build_transforms
from dfine.data.image_io import UnreadableImageError, load_image, read_image_size
from dfine.data.label_map import LabelEntry, LabelMap
from dfine.data.loader import (
    DataLoader,
    ShardSampler,
    build_dataloader,
    check_dataloader_block,
    per_rank_batch_size,
)
from dfine.data.sample_failures import TooManyFailedSamplesError
from dfine.data.synthetic import QuickstartDetection, ensure_quickstart
from dfine.data.transforms import letterbox_geometry, original_frame_size
from dfine.data.voc import VOCDetection
from dfine.data.yolo import YoloDetection

__all__ = [
    "AnnotationTable",
    "BatchImageCollateFunction",
    "CocoDetection",
    "Compose",
    "DataLoader",
    "DatasetReport",
    "DetectionDataset",
    "Finding",
    "LabelEntry",
    "LabelMap",
    "QuickstartDetection",
    "ShardSampler",
    "Target",
    "TooManyFailedSamplesError",
    "UnreadableImageError",
    "VOCDetection",
    "YoloDetection",
    "build_dataloader",
    "build_transforms",
    "check_dataloader_block",
    "check_dataset",
    "ensure_quickstart",
    "letterbox_geometry",
    "load_image",
    "multi_scale_sizes",
    "original_frame_size",
    "per_rank_batch_size",
    "read_image_size",
]
