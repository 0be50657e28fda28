"""INT8 post-training quantisation of an exported ONNX file, and COCO evaluation of an exported file.

Quantisation is onnxruntime's static QDQ quantisation (no extra package): per-channel int8 weights and uint8
activations whose ranges are calibrated (min/max) on preprocessed images, applied to ``Conv`` and ``MatMul``
only; the deformable-attention sampling and its weighted sum (:data:`FLOAT_SCOPE`), top-k and box decoding
stay float. The QDQ file runs in onnxruntime and in OpenVINO (which reads the QDQ pairs as its own int8
layers).

Evaluation runs an exported file with post-processing over a validation loader through the ordinary
evaluation loop (:class:`SessionDetector` stands in for model + post-processor), so its AP is comparable with
``dfine-eval``'s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dfine.config.registry import ConfigError
from dfine.deploy.onnx_export import IMAGE_INPUT, SIZE_INPUT, require_onnx

__all__ = [
    "FLOAT_SCOPE",
    "MIN_CALIBRATION_IMAGES",
    "SessionDetector",
    "calibration_feeds",
    "quantize_onnx_int8",
    "quantize_openvino_nncf",
]

logger = logging.getLogger(__name__)

# Below this, min/max ranges follow a handful of pictures and the AP drop is a matter of luck.
MIN_CALIBRATION_IMAGES = 16


def calibration_feeds(
    batches: Iterable[tuple[Tensor, Sequence[Mapping[str, Any]]]], num_images: int, source: str
) -> list[dict[str, np.ndarray]]:
    """``num_images`` single-image feeds (``images`` [1, 3, H, W], ``orig_target_sizes`` [1, 2]).

    Args:
        batches: a loader's ``(images, targets)`` batches, preprocessed as for evaluation.
        num_images: how many images to take.
        source: where the images come from, for the error message.

    Raises:
        ConfigError: fewer than :data:`MIN_CALIBRATION_IMAGES` requested or available (naming the source).
    """
    if num_images < MIN_CALIBRATION_IMAGES:
        raise ConfigError(
            f"--calib-images {num_images} is too few for INT8 calibration; use at least "
            f"{MIN_CALIBRATION_IMAGES} (300 is a good default)"
        )
    feeds: list[dict[str, np.ndarray]] = []
    for images, targets in batches:
        for image, target in zip(images, targets, strict=True):
            size = target["orig_size"].to(torch.int64).reshape(1, 2)
            feeds.append({IMAGE_INPUT: image[None].float().numpy(), SIZE_INPUT: size.numpy()})
            if len(feeds) == num_images:
                return feeds
    if len(feeds) < MIN_CALIBRATION_IMAGES:
        raise ConfigError(
            f"{source} has only {len(feeds)} images; INT8 calibration needs at least "
            f"{MIN_CALIBRATION_IMAGES}: point the dataset at more images"
        )
    logger.warning(
        "%s has %d images, fewer than the %d asked for: calibrating on all", source, len(feeds), num_images
    )
    return feeds


class _Reader:
    """onnxruntime's ``CalibrationDataReader`` protocol over prepared feeds (only the graph's inputs)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], input_names: Sequence[str]) -> None:
        self._feeds: Iterator[Mapping[str, np.ndarray]] = iter(feeds)
        self._names = list(input_names)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._feeds, None)
        return None if feed is None else {name: feed[name] for name in self._names}

    def rewind(self) -> None:  # pragma: no cover - called by some onnxruntime versions only
        pass


def quantize_onnx_int8(
    fp32_path: str | Path, int8_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]]
) -> Path:
    """Write an INT8 (QDQ) copy of ``fp32_path`` calibrated on ``feeds``.

    Args:
        fp32_path: the exported float32 ONNX file.
        int8_path: where the quantised file goes.
        feeds: calibration inputs from :func:`calibration_feeds`.

    Returns:
        ``int8_path``.
    """
    onnx, _ = require_onnx()
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    # One read of the graph gives the inputs and the nodes to leave float (no session to build for them).
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    input_names = [entry.name for entry in graph.input if entry.name not in weights]
    patterns = [re.compile(pattern) for pattern in FLOAT_SCOPE]
    float_nodes = [node.name for node in graph.node if any(p.fullmatch(node.name) for p in patterns)]
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(feeds, input_names)
    quantize_static(
        str(fp32_path),
        str(int8_path),
        reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul"],
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=float_nodes,
    )
    logger.info("wrote %s (int8 QDQ, calibrated on %d images)", int8_path, len(feeds))
    return Path(int8_path)


# Nodes both quantisers leave in float: the deployed deformable attention's sum over its sampled points (a
# MatMul with a row of ones, see MSDeformableAttention.convert_to_deploy). Its inputs are bilinear samples
# times softmax weights; quantised, it was slower under NNCF (quickstart model, OpenVINO, 2 threads: left
# float, 0.667x -> 0.651x of fp32 at batch 1 and 0.612x -> 0.575x at batch 8, AP 0.7636 -> 0.7638).
FLOAT_SCOPE = (r".*/cross_attn/MatMul(_\d+)?",)


def quantize_openvino_nncf(
    fp32_path: str | Path, xml_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]]
) -> Path:
    """Write an INT8 OpenVINO IR of ``fp32_path`` (ONNX) with NNCF's post-training quantisation.

    NNCF's transformer preset (``ModelType.TRANSFORMER``: SmoothQuant before the attention and FFN matrices,
    mixed symmetric / asymmetric ranges), calibrated on ``feeds``; everything but :data:`FLOAT_SCOPE` is
    quantised, the decoder's matrices included. On the quickstart model (AP 0.7636) it kept the AP
    (0.7634-0.7638) and ran at 0.58-0.61x of fp32 at batch 1 (static-batch file) and 0.53-0.58x at batch 8.
    Keeping the decoder layers in fp32, the previous choice, lost 0.0011 AP and ran at 0.78x and 0.63x where
    quantising them gave 0.72x and 0.58x (dynamic-batch file, same rounds). Without SmoothQuant it ran ~3%
    faster and lost 0.0019 AP. Needs ``pip install nncf``.

    Returns:
        ``xml_path`` (its ``.bin`` beside it).
    """
    from dfine.deploy.openvino_export import require_openvino

    ov = require_openvino()
    try:
        import nncf
    except ImportError as error:
        raise ImportError("--int8-method nncf needs NNCF: pip install nncf") from error
    model = ov.convert_model(str(fp32_path))
    names = [port.get_any_name() for port in model.inputs]
    dataset = nncf.Dataset(list(feeds), lambda feed: {name: feed[name] for name in names})
    # NNCF refuses a pattern that matches no node, so a renamed node fails here instead of being quantised
    float_scope = nncf.IgnoredScope(patterns=list(FLOAT_SCOPE))
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # else one INFO line per unquantised node reaches the user
    try:
        quantized = nncf.quantize(
            model,
            dataset,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            ignored_scope=float_scope,
        )
    finally:
        nncf_logger.setLevel(level)
    ov.save_model(quantized, str(xml_path), compress_to_fp16=False)
    logger.info("wrote %s (NNCF int8, calibrated on %d images)", xml_path, len(feeds))
    return Path(xml_path)


class SessionDetector(nn.Module):
    """An exported file with post-processing, in the place of the post-processor of the evaluation loop.

    Use with ``model=nn.Identity()``: ``evaluate`` then hands the images and original sizes straight here.

    Args:
        session: an onnxruntime session or :class:`~dfine.deploy.openvino_export.OpenVinoSession`.
        category_ids: the exported post-processor's ``category_ids`` (set when it maps COCO labels to ids).
    """

    def __init__(self, session: Any, category_ids: Any = None) -> None:
        super().__init__()
        self.session = session
        self.category_ids = category_ids
        self._static = isinstance(session.get_inputs()[0].shape[0], int)

    def forward(self, images: Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        sizes = orig_sizes.round().to(torch.int64)
        step = 1 if self._static else len(images)
        results: list[dict[str, Tensor]] = []
        for start in range(0, len(images), step):
            feed = {
                IMAGE_INPUT: images[start : start + step].float().cpu().numpy(),
                SIZE_INPUT: sizes[start : start + step].cpu().numpy(),
            }
            labels, boxes, scores = (torch.from_numpy(np.asarray(a)) for a in self.session.run(None, feed))
            results.extend(
                {"labels": labels[i], "boxes": boxes[i], "scores": scores[i]} for i in range(len(labels))
            )
        return results
