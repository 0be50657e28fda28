"""`Predictor` on an exported model: an ONNX file in onnxruntime or an OpenVINO IR, so users can check the
artefact they deploy on their own pictures (``dfine-predict -r model.onnx`` / ``-r model.xml``).

Preprocessing is the config's validation transforms, as for a checkpoint; class names come from the label map
stored in the file at export, else from the config (see `resolve_class_table`). The file must include the
post-processing (exported without ``--no-postprocess``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfine.config import Config
from dfine.deploy.onnx_export import DETECTION_OUTPUTS, IMAGE_INPUT, SIZE_INPUT, make_session
from dfine.deploy.openvino_export import OpenVinoSession, label_map_of
from dfine.inference.predictor import PredictInputError, Predictor, resolve_class_table, val_transforms

__all__ = ["EXPORTED_SUFFIXES", "ExportedPredictor", "open_exported"]

logger = logging.getLogger(__name__)

EXPORTED_SUFFIXES = (".onnx", ".xml")


def open_exported(path: str | os.PathLike, num_threads: int | None = None) -> Any:
    """An onnxruntime session for ``.onnx``, an :class:`OpenVinoSession` for ``.xml``."""
    path = Path(path)
    if path.suffix == ".xml":
        return OpenVinoSession(path, num_threads=num_threads)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")
    return make_session(path, num_threads=num_threads)


class ExportedPredictor(Predictor):
    """A `Predictor` whose model is an exported file (CPU).

    Args:
        cfg: the experiment config (validation transforms, ``num_classes`` / dataset for class names).
        path: ``model.onnx`` or ``model.xml`` (with its ``.bin``) written by ``dfine-export``.
        threshold: keep detections scoring at least this (0..1).
        num_threads: runtime threads (default: all cores).

    Raises:
        FileNotFoundError: the file (or the IR's ``.bin``) is missing.
        PredictInputError: the file has no post-processing, or ``threshold`` is outside 0..1.
    """

    def __init__(
        self,
        cfg: Config,
        path: str | os.PathLike,
        threshold: float = 0.5,
        num_threads: int | None = None,
    ) -> None:
        if not 0.0 <= float(threshold) <= 1.0:
            raise PredictInputError(f"threshold must be in 0..1, got {threshold} (e.g. --threshold 0.5)")
        self.threshold = float(threshold)
        self.device = torch.device("cpu")
        self.transforms = val_transforms(cfg)
        self.session = open_exported(path, num_threads)
        outputs = [port.name for port in self.session.get_outputs()]
        if outputs != list(DETECTION_OUTPUTS):
            raise PredictInputError(
                f"{path} outputs {outputs}, not {list(DETECTION_OUTPUTS)}: export it with post-processing "
                "(dfine-export without --no-postprocess)"
            )
        self._batch = self.session.get_inputs()[0].shape[0]  # 1, or a name / None when dynamic
        label_map = label_map_of(self.session)
        self.classes = resolve_class_table(cfg, {"label_map": label_map} if label_map else None)
        self._category_of_label = torch.tensor(self.classes.category_ids, dtype=torch.int64)
        self.weights_source = str(path)
        logger.info(
            "predicting with %s; %d class names from %s", path, len(self.classes), self.classes.source
        )

    def _detect(self, batch: Tensor, frames: Tensor) -> list[dict[str, Tensor]]:
        sizes = frames.round().to(torch.int64)
        step = 1 if isinstance(self._batch, int) else len(batch)  # a file exported without --dynamic-batch
        results: list[dict[str, Tensor]] = []
        for start in range(0, len(batch), step):
            feed: Mapping[str, Any] = {
                IMAGE_INPUT: batch[start : start + step].numpy(),
                SIZE_INPUT: sizes[start : start + step].numpy(),
            }
            labels, boxes, scores = (torch.from_numpy(a) for a in self.session.run(None, dict(feed)))
            results.extend(
                {"labels": labels[i], "boxes": boxes[i], "scores": scores[i]} for i in range(len(labels))
            )
        return results
