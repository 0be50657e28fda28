"""Detect objects in images and videos with a trained checkpoint, exactly as evaluation sees its images.

`Predictor` builds the model of a config, loads a checkpoint's weights strictly (EMA weights when present),
preprocesses every picture with the config's ``val_dataloader`` transforms (so the input size and any
letterboxing come from the config) and maps the boxes back to the picture's own pixels the way evaluation
does. Class names and category ids come from the checkpoint's label map, else from the config (see
`resolve_class_table`).

Example::

    cfg = dfine.load_config("configs/quickstart.yml")
    predictor = Predictor(cfg, "output/quickstart/best.pth", threshold=0.5)
    [prediction] = predictor.predict(["shapes.jpg"])
    prediction.names, prediction.boxes  # ['circle', 'star'], [2, 4] xyxy pixels of shapes.jpg
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from dfine.checkpoint import CheckpointError, extract_model_state, load_checkpoint, load_weights_strict
from dfine.config import Config
from dfine.config.build import build_model, build_postprocessor
from dfine.config.registry import DATASETS, ConfigError
from dfine.data.base import finalize_sample
from dfine.data.compose import build_transforms
from dfine.data.image_io import load_image
from dfine.data.label_map import LabelMap
from dfine.data.synthetic import QUICKSTART_CLASSES
from dfine.data.transforms import original_frame_size
from dfine.evaluation.loop import predict_batch
from dfine.models.coco_categories import COCO80_TO_COCO91, COCO_NAMES

__all__ = [
    "ClassTable",
    "PredictInputError",
    "Prediction",
    "Predictor",
    "resolve_class_table",
    "val_transforms",
]

logger = logging.getLogger(__name__)


class PredictInputError(ValueError):
    """An input cannot be predicted on (bad threshold, empty folder, unopenable video, OpenCV missing)."""


# ------------------------------------------------------------------------------------------------ class names
@dataclass(frozen=True)
class ClassTable:
    """What each contiguous label means.

    Attributes:
        names: class name of label 0..C'-1.
        category_ids: dataset category id of each label (what COCO results files use).
        source: where they came from, for the log ("the checkpoint's label map", "COCO", ...).
    """

    names: list[str]
    category_ids: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.names)


def _label_map_table(label_map: LabelMap, source: str) -> ClassTable:
    return ClassTable(label_map.names, label_map.category_ids, source)


def _dataset_label_map(cfg: Mapping[str, Any]) -> LabelMap | None:
    """The label map of the config's validation dataset, or None when it cannot be read here."""
    block = (cfg.get("val_dataloader") or {}).get("dataset")
    if not isinstance(block, Mapping):
        return None
    if block.get("type") == "QuickstartDetection":
        # Known without generating the images; ids 1..4 as dfine.data.synthetic writes them.
        return LabelMap({"id": i + 1, "name": name} for i, name in enumerate(QUICKSTART_CLASSES))
    try:
        dataset = DATASETS.build({**block, "transforms": None}, "val_dataloader.dataset")
    except (ConfigError, OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("class names: cannot read the val dataset's categories (%s)", error)
        return None
    return getattr(dataset, "label_map", None)


def resolve_class_table(cfg: Mapping[str, Any], checkpoint: Mapping[str, Any] | None) -> ClassTable:
    """Class names and category ids for a model, best source first.

    1. the checkpoint's ``label_map`` (``[{label, category_id, name}, ...]``, written by ``dfine-train``);
    2. COCO's 80 names and ids for a config with ``num_classes: 80`` and ``remap_mscoco_category: true``
       (the published D-FINE weights carry no label map);
    3. the categories of the config's ``val_dataloader`` dataset, when its annotation file is readable;
    4. ``class 0``, ``class 1``, ... with category id = label.

    Raises:
        CheckpointError: the checkpoint's ``label_map`` is malformed.
    """
    entries = checkpoint.get("label_map") if checkpoint is not None else None
    if entries:
        try:
            return _label_map_table(
                LabelMap.from_entries(entries, "checkpoint"), "the checkpoint's label map"
            )
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(
                f"the checkpoint's label_map is malformed ({error}); "
                "expected [{label, category_id, name}, ...]"
            ) from error
    num_classes = int(cfg.get("num_classes") or 0)
    if num_classes == len(COCO_NAMES) and cfg.get("remap_mscoco_category"):
        return ClassTable(list(COCO_NAMES), list(COCO80_TO_COCO91), "COCO")
    label_map = _dataset_label_map(cfg)
    if label_map is not None and len(label_map):
        return _label_map_table(label_map, f"the val dataset ({label_map.source or 'config'})")
    return ClassTable([f"class {i}" for i in range(num_classes)], list(range(num_classes)), "class numbers")


# ------------------------------------------------------------------------------------------------ predictions
@dataclass
class Prediction:
    """Detections of one picture, best first, all on the CPU.

    Attributes:
        labels: int64 [K] contiguous labels 0..C-1.
        boxes: float32 [K, 4] xyxy in pixels of the picture as loaded (EXIF orientation applied).
        scores: float32 [K] in 0..1, each >= the predictor's threshold.
        category_ids: int64 [K] dataset category ids.
        names: K class names.
        image_size: (width, height) of the picture in pixels.
    """

    labels: Tensor
    boxes: Tensor
    scores: Tensor
    category_ids: Tensor
    names: list[str]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.labels)

    def to_coco_results(self, image_id: int, **extra: Any) -> list[dict[str, Any]]:
        """COCO results entries: ``image_id``, ``extra`` (e.g. ``file_name``), ``category_id``, ``name``,
        ``bbox`` ``[x, y, w, h]`` in pixels and ``score``."""
        results = []
        for box, category_id, name, score in zip(
            self.boxes.tolist(), self.category_ids.tolist(), self.names, self.scores.tolist(), strict=True
        ):
            x1, y1, x2, y2 = box
            results.append(
                {
                    "image_id": image_id,
                    **extra,
                    "category_id": int(category_id),
                    "name": name,
                    "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                    "score": round(score, 5),
                }
            )
        return results

    def summary(self, top: int = 3) -> str:
        """The ``top`` best detections as ``circle 0.91, star 0.88``; ``-`` when there are none."""
        if not len(self):
            return "-"
        best = zip(self.names[:top], self.scores[:top].tolist(), strict=True)
        return ", ".join(f"{name} {score:.2f}" for name, score in best) + (", ..." if len(self) > top else "")


def _without_pretrained(cfg: Config) -> Config:
    """The config with the backbone's ImageNet file dropped: every weight comes from the checkpoint anyway."""
    data = copy.deepcopy(dict(cfg))
    backbone = (data.get("model") or {}).get("backbone")
    if isinstance(backbone, dict) and backbone.get("pretrained"):
        backbone["pretrained"] = None
    return Config(data, getattr(cfg, "sources", {}))


def val_transforms(cfg: Mapping[str, Any]) -> Any:
    """The config's validation transforms, which turn a picture into the model's input."""
    loader_block = cfg.get("val_dataloader")
    if not isinstance(loader_block, Mapping) or not isinstance(loader_block.get("dataset"), Mapping):
        raise ConfigError(
            "val_dataloader.dataset is missing: prediction preprocesses pictures with its transforms "
            "(e.g. a Resize to the model's input size and ConvertPILImage)"
        )
    where = cfg.where("val_dataloader.dataset.transforms") if isinstance(cfg, Config) else "transforms"
    return build_transforms(loader_block["dataset"].get("transforms"), where=where)


class Predictor:
    """A checkpoint ready to detect objects in pictures.

    Args:
        cfg: the experiment config (model, ``num_classes``, ``val_dataloader`` transforms, postprocessor).
        checkpoint: a ``.pth`` written by ``dfine-train`` or a published D-FINE file.
        device: ``cpu``, ``cuda``, ``cuda:1``; None: the config's ``device``, else CUDA when available.
        threshold: keep detections scoring at least this (0..1).
        fuse: switch the model to its deploy form (BatchNorm folded; same outputs, faster).

    Raises:
        FileNotFoundError: ``checkpoint`` is missing.
        CheckpointError: it cannot be read or does not fit the config's model (the message says what differs).
        ConfigError: the config has no ``val_dataloader`` transforms that build.
        PredictInputError: ``threshold`` is outside 0..1.
    """

    def __init__(
        self,
        cfg: Config,
        checkpoint: str | os.PathLike,
        device: str | torch.device | None = None,
        threshold: float = 0.5,
        fuse: bool = True,
    ) -> None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise PredictInputError(f"threshold must be in 0..1, got {threshold} (e.g. --threshold 0.5)")
        self.threshold = float(threshold)
        self.device = torch.device(
            device or cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        )
        self.transforms = val_transforms(cfg)

        loaded = load_checkpoint(checkpoint, cfg=cfg)
        weights, self.weights_source = extract_model_state(loaded)
        self.classes = resolve_class_table(cfg, loaded)
        self._category_of_label = torch.tensor(self.classes.category_ids, dtype=torch.int64)
        model = build_model(_without_pretrained(cfg))
        load_weights_strict(model, weights)
        model.to(self.device).eval()
        self.model = model.deploy() if fuse and hasattr(model, "deploy") else model
        # Contiguous labels out; the class table maps them to category ids (for COCO: the remap's ids).
        plain = Config({**cfg, "remap_mscoco_category": False}, getattr(cfg, "sources", {}))
        self.postprocessor = build_postprocessor(plain).to(self.device).eval()
        logger.info(
            "predicting with the %s weights of %s on %s; %d class names from %s",
            self.weights_source,
            checkpoint,
            self.device,
            len(self.classes),
            self.classes.source,
        )

    @property
    def class_names(self) -> list[str]:
        """Class names indexed by contiguous label."""
        return list(self.classes.names)

    def preprocess(self, image: Image.Image) -> tuple[Tensor, Tensor]:
        """One picture as the validation loader would hand it to the model.

        Returns:
            ``(input float32 [3, H, W] in 0..1, frame float32 [2])`` where ``frame`` is the (width, height)
            that turns normalised boxes into pixels of ``image`` (the letterboxed frame when the config pads).
        """
        width, height = image.size
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.zeros(0, 4), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
            ),
            "labels": torch.zeros(0, dtype=torch.int64),
            "image_id": torch.tensor(0, dtype=torch.int64),
            "orig_size": torch.tensor([width, height], dtype=torch.int64),
        }
        inputs, target = self.transforms(image, target)
        inputs, target = finalize_sample(inputs, target)
        return inputs, original_frame_size(target).to(torch.float32)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image | str | os.PathLike]) -> list[Prediction]:
        """Detect objects in a few pictures (one batch per input shape).

        Args:
            images: RGB PIL images or image file paths (read upright, as the datasets read them).

        Returns:
            One `Prediction` per picture, in order.

        Raises:
            FileNotFoundError, UnreadableImageError: a path cannot be read (the message names it).
        """
        pictures = [item if isinstance(item, Image.Image) else load_image(item) for item in images]
        pictures = [picture if picture.mode == "RGB" else picture.convert("RGB") for picture in pictures]
        inputs = [self.preprocess(picture) for picture in pictures]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (tensor, _) in enumerate(inputs):
            groups.setdefault(tuple(tensor.shape), []).append(index)
        predictions: list[Prediction | None] = [None] * len(pictures)
        for indices in groups.values():
            batch = torch.stack([inputs[i][0] for i in indices]).to(self.device)  # [B, 3, H, W]
            frames = torch.stack([inputs[i][1] for i in indices]).to(self.device)  # [B, 2] (w, h)
            results = self._detect(batch, frames)
            for index, result in zip(indices, results, strict=True):
                predictions[index] = self._select(result, pictures[index].size)
        return predictions  # type: ignore[return-value]

    def _detect(self, batch: Tensor, frames: Tensor) -> list[dict[str, Tensor]]:
        """Per picture ``labels``, ``boxes`` (xyxy pixels of ``frames``), ``scores``, best first."""
        return predict_batch(self.model, self.postprocessor, batch, frames)

    def _select(self, result: Mapping[str, Tensor], image_size: tuple[int, int]) -> Prediction:
        """Detections above the threshold whose label has a class (as evaluation drops the others)."""
        labels, scores = result["labels"].cpu(), result["scores"].float().cpu()
        keep = (scores >= self.threshold) & (labels < len(self.classes))  # [K]
        labels = labels[keep]
        return Prediction(
            labels=labels,
            boxes=result["boxes"].float().cpu()[keep],
            scores=scores[keep],
            category_ids=self._category_of_label[labels],
            names=[self.classes.names[int(label)] for label in labels],
            image_size=(int(image_size[0]), int(image_size[1])),
        )
