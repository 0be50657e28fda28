"""HuggingFace model folders as users meet them: ready for the documented snippet, and usable as checkpoints.

Writing: besides ``model.safetensors`` + ``config.json`` the HF D-FINE snippet needs a
``preprocessor_config.json`` (``RTDetrImageProcessor.from_pretrained``) and class names in ``id2label``.
:func:`processor_settings` derives the processor from our validation transforms and refuses what it cannot
express (a letterbox: HF's post-processing scales boxes by the picture size, which is wrong for a padded
input). The dataset's category ids travel in ``config.json`` under ``dfine_category_ids`` (transformers keeps
unknown config keys) so that evaluation of a folder scores against the right ids.

Reading: :func:`checkpoint_from_hf_folder` turns a folder into the mapping a ``.pth`` gives
(``{"model": state_dict, "label_map": [...]}``) and runs the converter's output check: our model and HF's on
the same random image must agree.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfine.checkpoint import CheckpointError
from dfine.hf.config import import_transformers
from dfine.hf.conversion import load_hf_pretrained

__all__ = [
    "CATEGORY_IDS_KEY",
    "checkpoint_from_hf_folder",
    "compare_outputs",
    "label_entries",
    "label_settings",
    "processor_settings",
]

logger = logging.getLogger(__name__)

CATEGORY_IDS_KEY = "dfine_category_ids"
# PIL resampling numbers, which RTDetrImageProcessor stores as ``resample``
_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
# transforms that do not touch the pixels of a validation image
_IMAGE_NEUTRAL = {"ConvertBoxes", "SanitizeBoundingBoxes"}
_LETTERBOX_HELP = (
    "HuggingFace's RTDetrImageProcessor + post_process_object_detection cannot express a letterbox "
    "(Resize keep_ratio: true): its post-processing scales boxes by the picture's size, not the padded "
    "frame. "
    "Use the folder with your own preprocessing, or dfine-predict / an exported ONNX model"
)


def _val_ops(cfg: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    dataset = ((cfg.get("val_dataloader") or {}).get("dataset")) or {}
    transforms = dataset.get("transforms") or {}
    ops = transforms.get("ops") if isinstance(transforms, Mapping) else None
    if not isinstance(ops, list) or not ops:
        raise ValueError(
            "val_dataloader.dataset.transforms.ops is missing: the image processor is derived from the "
            "validation transforms (Resize + ConvertPILImage)."
        )
    return ops


def processor_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``RTDetrImageProcessor`` keyword arguments reproducing our validation preprocessing.

    Args:
        cfg: our resolved config (``eval_spatial_size`` and ``val_dataloader.dataset.transforms``).

    Returns:
        resize to ``eval_spatial_size`` [H, W] with the Resize's interpolation, rescale by 1/255, no
        normalisation, no padding.

    Raises:
        ValueError: a transform HF's processor cannot express (a letterbox, a normalisation, ...), naming it.
    """
    resize = None
    scaled = False
    for index, op in enumerate(_val_ops(cfg)):
        kind = op.get("type")
        where = f"val_dataloader.dataset.transforms.ops[{index}] ({kind})"
        if kind == "Resize":
            if op.get("keep_ratio"):
                raise ValueError(f"{where}: {_LETTERBOX_HELP}.")
            resize = op
        elif kind == "ConvertPILImage":
            scaled = bool(op.get("scale", True))
        elif kind not in _IMAGE_NEUTRAL:
            raise ValueError(
                f"{where} has no RTDetrImageProcessor counterpart; the HF folder can be used without a "
                "preprocessor_config.json, with preprocessing written by hand."
            )
    if resize is None:
        raise ValueError(
            "val_dataloader.dataset.transforms has no Resize: the model's input size is unknown."
        )
    size = cfg.get("eval_spatial_size") or resize.get("size")
    size = [size, size] if isinstance(size, int) else list(size)
    interpolation = str(resize.get("interpolation", "bilinear")).lower()
    if interpolation not in _RESAMPLE:
        raise ValueError(f"Resize interpolation {interpolation!r}: use one of {', '.join(_RESAMPLE)}.")
    return {
        "do_resize": True,
        "size": {"height": int(size[0]), "width": int(size[-1])},
        "resample": _RESAMPLE[interpolation],
        "do_rescale": scaled,
        "rescale_factor": 1 / 255,
        "do_normalize": False,
        "do_pad": False,
    }


def label_settings(names: Sequence[str], category_ids: Sequence[int]) -> dict[str, Any]:
    """``DFineConfig`` attributes naming the classes: ``id2label``, ``label2id`` and our category ids."""
    return {
        "id2label": {index: str(name) for index, name in enumerate(names)},
        "label2id": {str(name): index for index, name in enumerate(names)},
        CATEGORY_IDS_KEY: [int(i) for i in category_ids],
    }


def compare_outputs(ours: Mapping[str, Tensor], theirs: Any, tolerance: float) -> tuple[float, float, int]:
    """Max |logits| and |boxes| differences, letting queries that swapped rank be compared with each other.

    Near-tied encoder scores may leave the top-k in another order in the two implementations; a row that
    differs in place is compared with its nearest row of the other model instead, and counted.

    Args:
        ours: our model's eval output (``pred_logits`` [B, Q, C], ``pred_boxes`` [B, Q, 4]).
        theirs: ``DFineForObjectDetection``'s output (``logits``, ``pred_boxes`` of the same shapes).
        tolerance: differences above it count as a moved query.

    Returns:
        ``(max logits difference, max boxes difference, queries compared out of place)``.
    """
    ours_rows = torch.cat((ours["pred_logits"], ours["pred_boxes"]), dim=-1)  # [B, Q, C + 4]
    hf_rows = torch.cat((theirs.logits, theirs.pred_boxes), dim=-1)
    difference = (ours_rows - hf_rows).abs()  # [B, Q, C + 4]
    moved = 0
    for image, query in (difference.amax(-1) > tolerance).nonzero().tolist():
        nearest = (hf_rows[image] - ours_rows[image, query]).abs().amax(-1).argmin()
        difference[image, query] = (hf_rows[image, nearest] - ours_rows[image, query]).abs()
        moved += 1
    classes = ours["pred_logits"].shape[-1]
    return difference[..., :classes].max().item(), difference[..., classes:].max().item(), moved


def label_entries(config: Any) -> list[dict[str, Any]] | None:
    """The label map of a ``DFineConfig``: named classes with our category ids, or COCO's; else None."""
    from dfine.models.coco_categories import COCO80_TO_COCO91, COCO_NAMES

    names = [str(config.id2label[i]) for i in sorted(config.id2label, key=int)]
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    ids = getattr(config, CATEGORY_IDS_KEY, None)
    if not (isinstance(ids, list) and len(ids) == len(names)):
        if names != list(COCO_NAMES):
            # names without ids: the config's dataset decides ids (and names) for evaluation and prediction
            return None
        ids = list(COCO80_TO_COCO91)
    return [
        {"label": label, "category_id": int(category_id), "name": name}
        for label, (category_id, name) in enumerate(zip(ids, names, strict=True))
    ]


def _read_model_type(folder: Path) -> None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder} is a folder without config.json: -r/-t take a .pth checkpoint or a HuggingFace D-FINE "
            "folder (config.json + model.safetensors, e.g. written by tools/convert_weights.py)"
        )
    try:
        data = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_file} is not readable JSON ({error})") from error
    model_type = data.get("model_type")
    if model_type != "d_fine":
        architectures = ", ".join(data.get("architectures") or []) or "no architectures listed"
        raise CheckpointError(
            f"{config_file} describes a {model_type!r} model ({architectures}), not D-FINE: give a "
            "DFineForObjectDetection folder (model_type 'd_fine'), or a .pth checkpoint"
        )


def _check_model(cfg: Mapping[str, Any], num_classes: int) -> torch.nn.Module:
    from dfine.config import Config
    from dfine.config.build import build_model

    data = copy.deepcopy(dict(cfg))
    data["num_classes"] = num_classes
    backbone = (data.get("model") or {}).get("backbone")
    if isinstance(backbone, dict):
        backbone["pretrained"] = None  # every weight comes from the folder
    return build_model(Config(data, getattr(cfg, "sources", {}))).eval().use_channels_last()


def checkpoint_from_hf_folder(
    folder: str | Path, cfg: Mapping[str, Any], tolerance: float = 1e-4
) -> dict[str, Any]:
    """Read a HuggingFace D-FINE folder as if it were a ``.pth`` checkpoint, after an output check.

    Args:
        folder: ``config.json`` + ``model.safetensors`` of a ``DFineForObjectDetection``.
        cfg: our resolved config of the model the weights go into (its ``num_classes`` may differ, as for
            fine-tuning: the check builds the folder's class count).
        tolerance: largest accepted output difference between our model and HF's on one random image.

    Returns:
        ``{"model": state_dict in our layout, "label_map": [...]}`` (no ``label_map`` when the folder's
        classes are unnamed, or named without category ids other than COCO's).

    Raises:
        CheckpointError: no config.json, another architecture, weights that do not fit ``cfg``'s model, or
            outputs that differ above ``tolerance`` (each message names the folder).
    """
    folder = Path(folder)
    _read_model_type(folder)
    try:
        state, config = load_hf_pretrained(folder, cfg)
    except (ValueError, FileNotFoundError) as error:
        raise CheckpointError(f"{folder}: {error}") from error
    model = _check_model(cfg, int(config.num_labels))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"the weights of {folder} do not fit the model of the config (another size?): "
            f"{str(error).splitlines()[0]}; use the config the folder was converted with"
        ) from error
    hf_model = import_transformers().DFineForObjectDetection.from_pretrained(
        str(folder), local_files_only=True
    )
    size = cfg.get("eval_spatial_size") or [640, 640]
    # square: for H != W the HF port orders the encoder's position embedding differently (see conversion)
    images = torch.rand(1, 3, int(size[0]), int(size[0]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, boxes, moved = compare_outputs(model(images), hf_model.eval()(pixel_values=images), tolerance)
    if max(logits, boxes) > tolerance:
        raise CheckpointError(
            f"{folder}: our model and HuggingFace's differ on the same image by {max(logits, boxes):.2e} "
            f"(tolerance {tolerance:g}); the folder's config.json does not describe the config's model"
        )
    logger.info(
        "read HF folder %s: outputs match HF's (max |logits| %.1e, |boxes| %.1e, %d queries reordered)",
        folder,
        logits,
        boxes,
        moved,
    )
    checkpoint: dict[str, Any] = {"model": state}
    entries = label_entries(config)
    if entries:
        checkpoint["label_map"] = entries
    return checkpoint
