"""``dfine-export --int8``: quantise the exported ONNX file, then score fp32 and INT8 on the validation set.

Calibration images are the training set's first ``--calib-images`` pictures, preprocessed with the validation
transforms (the validation set's when the training set cannot be read), so the AP is not measured on the
pictures the ranges were fitted to. Prints fp32 AP, INT8 AP, the drop and the speed-up in the same runtime;
the export fails (exit 1) when the drop exceeds ``--max-ap-drop``. Called from ``dfine.cli.export``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["BATCHED_TIMING", "quantize_and_evaluate"]

# The second batch size timed when the file takes any batch (--dynamic-batch): the throughput setting.
BATCHED_TIMING = 8


def _loaders(cfg: Mapping[str, Any]) -> tuple[Any, Any, str]:
    """(calibration loader, validation loader, calibration source)."""
    from dfine.config.registry import ConfigError
    from dfine.data import build_dataloader

    val_block = cfg["val_dataloader"]
    val = build_dataloader(val_block, split="val", num_classes=cfg.get("num_classes"), where="val_dataloader")
    train_dataset = (cfg.get("train_dataloader") or {}).get("dataset")
    if isinstance(train_dataset, Mapping):
        block = {
            **val_block,
            "dataset": {**train_dataset, "transforms": val_block["dataset"].get("transforms")},
        }
        try:
            calibration = build_dataloader(
                block, split="val", num_classes=cfg.get("num_classes"), where="train"
            )
            return calibration, val, "train_dataloader.dataset"
        except (ConfigError, OSError, ValueError, KeyError) as error:
            print(f"note: calibrating on the validation images: the training set cannot be read ({error})")
    return val, val, "val_dataloader.dataset"


def _evaluate(session: Any, loader: Any, cfg: Mapping[str, Any], postprocessor: Any, label_map: Any) -> float:
    import torch
    from torch import nn

    from dfine.deploy.quantize import SessionDetector
    from dfine.evaluation.coco_evaluator import build_evaluator
    from dfine.evaluation.loop import evaluate

    evaluator = build_evaluator(cfg.get("evaluator"), loader.dataset.to_coco_dict(), "evaluator")
    detector = SessionDetector(session, getattr(postprocessor, "category_ids", None))
    category_ids = [int(entry["category_id"]) for entry in label_map] if label_map else None
    metrics = evaluate(nn.Identity(), detector, loader, torch.device("cpu"), evaluator, category_ids)
    return float(metrics["AP"])


def quantize_and_evaluate(
    onnx_path: Path,
    cfg: Mapping[str, Any],
    postprocessor: Any,
    args: argparse.Namespace,
    metadata: Mapping[str, str],
) -> bool:
    """Write ``<name>_int8.onnx`` (and ``.xml`` with ``--format openvino``), evaluate and time both.

    Returns:
        Whether the AP drop is within ``--max-ap-drop``.
    """
    from dfine.config.registry import ConfigError
    from dfine.deploy.onnx_export import make_session
    from dfine.deploy.openvino_export import OpenVinoSession, convert_onnx_to_openvino
    from dfine.deploy.quantize import calibration_feeds, quantize_onnx_int8, quantize_openvino_nncf

    if postprocessor is None:
        raise ConfigError("--int8 evaluates the exported detections: export without --no-postprocess")
    calibration, val, source = _loaders(cfg)
    feeds = calibration_feeds(calibration, args.calib_images, source)
    if args.int8_method == "nncf":
        fp32_xml = onnx_path.with_suffix(".xml")
        if not fp32_xml.is_file():
            fp32_xml = convert_onnx_to_openvino(onnx_path, fp32_xml, metadata)
        int8_xml = quantize_openvino_nncf(onnx_path, onnx_path.with_name(f"{onnx_path.stem}_int8.xml"), feeds)
        print(f"wrote {int8_xml} (NNCF INT8, calibrated on {len(feeds)} images of {source})")
        sessions = {
            "fp32": OpenVinoSession(fp32_xml, args.threads),
            "int8": OpenVinoSession(int8_xml, args.threads),
        }
        return _score(sessions, "OpenVINO", val, cfg, postprocessor, metadata, feeds, args)
    int8_path = quantize_onnx_int8(onnx_path, onnx_path.with_name(f"{onnx_path.stem}_int8.onnx"), feeds)
    print(f"wrote {int8_path} (INT8, calibrated on {len(feeds)} images of {source})")
    sessions = {
        "fp32": make_session(onnx_path, args.threads, spinning=False),
        "int8": make_session(int8_path, args.threads, spinning=False),
    }
    runtime = "onnxruntime"
    if args.format == "openvino":
        int8_xml = convert_onnx_to_openvino(int8_path, int8_path.with_suffix(".xml"), metadata)
        print(f"wrote {int8_xml} (OpenVINO IR of the INT8 model)")
        sessions = {
            "fp32": OpenVinoSession(onnx_path.with_suffix(".xml"), args.threads),
            "int8": OpenVinoSession(int8_xml, args.threads),
        }
        runtime = "OpenVINO"
    return _score(sessions, runtime, val, cfg, postprocessor, metadata, feeds, args)


def _score(
    sessions: Mapping[str, Any],
    runtime: str,
    val: Any,
    cfg: Mapping[str, Any],
    postprocessor: Any,
    metadata: Mapping[str, str],
    feeds: Any,
    args: argparse.Namespace,
) -> bool:
    """fp32 and INT8 AP on the validation set and latency at batch 1 (and 8 with --dynamic-batch).

    Returns:
        False when the AP drop is larger than ``--max-ap-drop``.
    """
    import numpy as np

    from dfine.deploy.export_check import benchmark_runtimes

    label_map = json.loads(metadata["dfine.label_map"]) if "dfine.label_map" in metadata else None
    ap = {name: _evaluate(session, val, cfg, postprocessor, label_map) for name, session in sessions.items()}
    drop = ap["fp32"] - ap["int8"]
    print(f"INT8 in {runtime}, {len(val.dataset)} validation images:")
    for name in ("fp32", "int8"):
        print(f"  {name}: AP {ap[name]:.4f}")
    print(f"  AP drop {drop:+.4f} (max {args.max_ap_drop:g})")
    for batch_size in (1, BATCHED_TIMING) if args.dynamic_batch else (1,):
        feed = {
            name: np.concatenate([feeds[index % len(feeds)][name] for index in range(batch_size)])
            for name in feeds[0]
        }
        timings = benchmark_runtimes(
            {name: (lambda s=session, f=feed: s.run(None, f)) for name, session in sessions.items()},
            batch_size=batch_size,
            warmup=min(3, args.iterations),
            iterations=args.iterations,
        )
        ratio = timings["int8"].median_ms / timings["fp32"].median_ms
        print(f"  batch {batch_size}: INT8 latency x{ratio:.2f} of fp32")
        for name in ("fp32", "int8"):
            print(f"    {name}: {timings[name].summary()}")
    if drop > args.max_ap_drop:
        print(
            f"error: INT8 loses {drop:.4f} AP, more than --max-ap-drop {args.max_ap_drop:g}; calibrate on "
            "more images (--calib-images) or ship the fp32 model"
        )
        return False
    return True
