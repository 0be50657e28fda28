"""``dfine-export``: write a checkpoint as an ONNX file and check it in onnxruntime against PyTorch.

The graph is the deployed model (BatchNorm folded, re-parameterised) with post-processing: inputs ``images``
float32 [B, 3, H, W] in 0..1 and ``orig_target_sizes`` int64 [B, 2] (width, height); outputs ``labels``
[B, K], ``boxes`` [B, K, 4] (xyxy pixels of the original image) and ``scores`` [B, K]. H, W are the config's
eval_spatial_size (the decoder's anchors are computed for it, so H and W are fixed; only the batch can be
dynamic). The file is then run on the first validation images (preprocessed as for evaluation) at batch 1,
and with --dynamic-batch also 2 and 8; the maximum differences are printed and the exit code is 1 when one is
above --tolerance.

Examples:
    dfine-export -c configs/quickstart.yml -r output/quickstart/best.pth --dynamic-batch --benchmark
    dfine-export -c CFG -r CKPT -o model.onnx --opset 17 --simplify
    dfine-export -c CFG -r CKPT --no-postprocess              # outputs pred_logits, pred_boxes (cxcywh 0..1)
    dfine-export -c CFG -r CKPT -u model.decoder.cross_attn_method=discrete   # graph without GridSample
    dfine-export -c CFG -r CKPT --random-inputs               # check on random images (no dataset needed)
    dfine-export -c CFG -r CKPT --format openvino --dynamic-batch --benchmark --threads 2
    dfine-export -c CFG -r hf/my_model ...                    # an HF folder (config.json + model.safetensors)
    dfine-export -c CFG -r CKPT --int8 --calib-images 300 --max-ap-drop 0.01   # + INT8, scored on val

--format openvino converts the ONNX file to an OpenVINO IR (model.xml + model.bin, same inputs and outputs),
checks it against PyTorch in the same way, and --benchmark then times PyTorch, onnxruntime and OpenVINO on the
same batches (1, and 8 with --dynamic-batch), interleaved.

Needs onnx and onnxruntime: pip install -e ".[export]". --simplify also needs onnxsim (pip install onnxsim);
--format openvino needs openvino (pip install -e ".[openvino]").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dfine.cli.common import add_config_arguments, config_from_args, run_cli
from dfine.config.registry import ConfigError

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

NUM_SAMPLES = 8  # distinct images checked; batches cycle through them
SCORE_THRESHOLD = 0.5  # the end-to-end benchmark keeps detections above it, as a real application would


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfine-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument("-r", "--resume", required=True, metavar="CKPT", help="checkpoint to export")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="FILE",
        help="ONNX file (default: <output_dir>/model.onnx, or beside the checkpoint without output_dir; "
        "model_raw.onnx with --no-postprocess)",
    )
    parser.add_argument(
        "--format",
        choices=("onnx", "openvino"),
        default="onnx",
        help="onnx (default), or openvino: the ONNX file plus an OpenVINO IR converted from it",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17; >= 16)")
    parser.add_argument(
        "--dynamic-batch",
        action="store_true",
        help="symbolic batch dimension (checked at batch 1, 2 and 8); the image size stays the config's "
        "eval_spatial_size either way",
    )
    parser.add_argument("--simplify", action="store_true", help="simplify with onnxsim (pip install onnxsim)")
    parser.add_argument(
        "--no-postprocess",
        action="store_true",
        help="export raw outputs pred_logits [B, Q, C] and pred_boxes [B, Q, 4] (cxcywh 0..1), no top-k",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest accepted difference to PyTorch for boxes (fraction of the image size) and scores; "
        "labels must match exactly (default 1e-4)",
    )
    parser.add_argument(
        "--benchmark",
        action="store_true",
        help="time end to end (preprocess + model + postprocess) and the model alone in onnxruntime",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write <name>_int8.onnx (onnxruntime static QDQ quantisation; and its .xml with --format "
        "openvino), evaluate fp32 and INT8 on the validation set and time both; exit 1 above --max-ap-drop",
    )
    parser.add_argument(
        "--int8-method",
        choices=("onnxruntime", "nncf"),
        default="onnxruntime",
        help="onnxruntime static QDQ (default; no extra package), or OpenVINO NNCF (pip install nncf; "
        "scored in OpenVINO)",
    )
    parser.add_argument(
        "--calib-images", type=int, default=300, help="INT8 calibration images (default: %(default)s)"
    )
    parser.add_argument(
        "--max-ap-drop", type=float, default=0.01, help="largest accepted INT8 AP drop (default: %(default)s)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=20,
        help="timed runs per runtime and batch of --format openvino's benchmark",
    )
    parser.add_argument(
        "--random-inputs",
        action="store_true",
        help="check with random images instead of the config's validation images",
    )
    parser.add_argument(
        "--threads", type=int, default=None, metavar="N", help="onnxruntime threads (default: all cores)"
    )
    return parser


def _image_size(cfg: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> list[int]:
    """eval_spatial_size of the config, else of the config saved in the checkpoint."""
    size = cfg.get("eval_spatial_size")
    saved = (checkpoint.get("config") or {}).get("eval_spatial_size")
    if size is None:
        size = saved
    if size is None:
        raise ConfigError(
            "eval_spatial_size is not set in the config or the checkpoint: the export size must be fixed "
            "(the decoder's anchors depend on it); set it, e.g. -u eval_spatial_size=[640,640]"
        )
    if saved is not None and list(saved) != list(size):
        logger.warning(
            "exporting at %s, but the checkpoint was trained with eval_spatial_size %s", size, saved
        )
    return [int(size[0]), int(size[1])]


def _validation_samples(cfg: Mapping[str, Any], image_size: Sequence[int]):  # type: ignore[no-untyped-def]
    """The first validation images as the evaluation pipeline makes them, and a timed reader of them."""
    import torch

    from dfine.data import build_dataloader, original_frame_size

    try:
        dataset = build_dataloader(
            cfg["val_dataloader"], split="val", num_classes=cfg.get("num_classes"), where="val_dataloader"
        ).dataset
        items = [dataset[index] for index in range(min(NUM_SAMPLES, len(dataset)))]
    except (ConfigError, OSError, KeyError, ValueError) as error:
        raise ConfigError(
            f"cannot read sample images from the config's val_dataloader ({type(error).__name__}: {error}); "
            "fix the dataset paths or pass --random-inputs to check with random images"
        ) from error
    if not items:
        raise ConfigError("the validation dataset is empty; pass --random-inputs to check with random images")
    images = torch.stack([image for image, _ in items])
    if list(images.shape[-2:]) != list(image_size):
        raise ConfigError(
            f"val_dataloader's transforms give {list(images.shape[-2:])} images but eval_spatial_size is "
            f"{list(image_size)}; make the validation Resize match eval_spatial_size"
        )
    sizes = torch.stack([original_frame_size(target) for _, target in items])

    def preprocess() -> dict[str, Any]:
        image, target = dataset[0]
        return {"images": image[None].numpy(), "orig_target_sizes": _size_array(original_frame_size(target))}

    return images, sizes, preprocess


def _size_array(size: Any) -> Any:
    import torch

    return torch.as_tensor(size).round().to(torch.int64).reshape(1, 2).numpy()


def _random_samples(cfg: Mapping[str, Any], image_size: Sequence[int]):  # type: ignore[no-untyped-def]
    """Seeded random images, and a preprocess running the validation transforms on a random frame."""
    import numpy as np
    import torch
    from PIL import Image

    from dfine.data import build_transforms
    from dfine.models.realistic_weights import random_images

    height, width = image_size
    images = random_images(NUM_SAMPLES, height, width, seed=0)
    frame_sizes = [[width, height], [width * 3 // 2, height * 3 // 2]]  # as if resized from these frames
    sizes = torch.tensor([frame_sizes[index % 2] for index in range(NUM_SAMPLES)], dtype=torch.float32)
    block = ((cfg.get("val_dataloader") or {}).get("dataset") or {}).get("transforms")
    transforms = build_transforms(block, where="val_dataloader.dataset.transforms")
    # A frame larger than the model input, as from a camera, so the timed resize does real work.
    pixels = np.random.default_rng(0).integers(0, 256, (height * 3 // 2, width * 3 // 2, 3), dtype=np.uint8)
    frame = Image.fromarray(pixels)

    def preprocess() -> dict[str, Any]:
        image = transforms(frame)
        if not isinstance(image, torch.Tensor) or image.dtype != torch.float32:
            raise ConfigError("val_dataloader's transforms must end with ConvertPILImage(float32, scale)")
        return {"images": image[None].numpy(), "orig_target_sizes": _size_array(frame.size)}

    return images, sizes, preprocess


def _final_detections(postprocessor: Any) -> Callable[[list[Any]], Any]:
    """Outputs -> per-image detections above the threshold (raw outputs go through ``postprocessor``)."""
    import torch

    def finish(outputs: list[Any]) -> list[tuple[Any, Any, Any]]:
        if postprocessor is not None:
            logits, boxes = (torch.from_numpy(array) for array in outputs)
            sizes = torch.ones(logits.shape[0], 2)  # boxes stay normalised; only the work is timed here
            found = postprocessor({"pred_logits": logits, "pred_boxes": boxes}, sizes)
            outputs = [torch.stack([d[key] for d in found]).numpy() for key in ("labels", "boxes", "scores")]
        labels, boxes, scores = outputs
        keep = scores > SCORE_THRESHOLD
        return [(labels[i][keep[i]], boxes[i][keep[i]], scores[i][keep[i]]) for i in range(len(labels))]

    return finish


def _providers(device: Any) -> list[str]:
    """onnxruntime providers matching the PyTorch device: CUDA when both have it, else the CPU."""
    from dfine.deploy.onnx_export import require_onnx

    available = require_onnx()[1].get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.type == "cuda":
        logger.warning(
            "onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); checking on the CPU"
        )
    return ["CPUExecutionProvider"]


def _check_batches(
    path: Path,
    reference: Any,
    images: Any,
    sizes: Any,
    args: argparse.Namespace,
    providers: list[str],
    session: Any = None,
) -> bool:
    """Parity at batch 1 (and 2, 8 with --dynamic-batch) in onnxruntime, or in ``session`` (OpenVINO)."""
    from dfine.deploy.export_check import check_onnx_parity, repeat_to_batch
    from dfine.deploy.onnx_export import baked_batch_dimension, make_session

    runtime = "onnxruntime" if session is None else "OpenVINO"
    if session is None:
        baked = baked_batch_dimension(path)
        if baked and args.dynamic_batch:
            print(f"warning: batch dimension baked in as a constant for {', '.join(baked)} (--dynamic-batch)")
        elif baked:
            print("note: the batch dimension is fixed to 1; export with --dynamic-batch to run other sizes")
        session = make_session(path, num_threads=args.threads, providers=providers)
    print(f"{runtime} against PyTorch:")
    passed = True
    for batch_size in (1, 2, 8) if args.dynamic_batch else (1,):
        batch, batch_sizes = repeat_to_batch(images, None if args.no_postprocess else sizes, batch_size)
        try:
            result = check_onnx_parity(
                path, reference, batch, batch_sizes, tolerance=args.tolerance, session=session
            )
        except Exception as error:  # onnxruntime raises its own types (e.g. a baked reshape at batch 2)
            print(f"batch {batch_size}: {runtime} failed: {type(error).__name__}: {str(error)[:300]}")
            passed = False
            continue
        print(result.summary())
        passed = passed and result.passed
    return passed


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Config (at the export size), the checkpoint's model and post-processor, and the file's metadata."""
    import torch

    from dfine.checkpoint import extract_model_state, load_checkpoint, load_weights_strict
    from dfine.config.build import build_model, build_postprocessor

    device_override = [f"device={args.device}"] if args.device else []
    base_cfg = config_from_args(args, device_override)
    checkpoint = load_checkpoint(args.resume, cfg=base_cfg)
    image_size = _image_size(base_cfg, checkpoint)
    cfg = config_from_args(args, [*device_override, f"eval_spatial_size=[{image_size[0]}, {image_size[1]}]"])
    device = torch.device(cfg.get("device") or "cpu")  # CPU unless asked: onnxruntime checks on the CPU
    if device.type == "cuda":
        # TF32 convolutions differ from fp32 by ~1e-3, far above the parity tolerance.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    weights, source = extract_model_state(checkpoint)
    model = build_model(cfg)
    load_weights_strict(model, weights)
    model.to(device)
    postprocessor = None if args.no_postprocess else build_postprocessor(cfg).to(device)
    metadata = {"dfine.checkpoint": Path(args.resume).name, "dfine.weights": source}
    if isinstance(checkpoint.get("label_map"), list):
        metadata["dfine.label_map"] = json.dumps([dict(entry) for entry in checkpoint["label_map"]])
    return cfg, device, model, postprocessor, image_size, metadata


def _benchmark(
    path: Path,
    cfg: Any,
    images: Any,
    sizes: Any,
    preprocess: Any,
    args: argparse.Namespace,
    providers: list[str],
) -> None:
    from dfine.config.build import build_postprocessor
    from dfine.deploy.export_check import benchmark_onnx
    from dfine.deploy.onnx_export import make_session

    feed = {"images": images[:1].cpu().numpy()}
    if args.no_postprocess:
        preprocess = _drop_sizes(preprocess)
    else:
        feed["orig_target_sizes"] = _size_array(sizes[0].cpu())
    timings = benchmark_onnx(
        path,
        feed,
        preprocess=preprocess,
        postprocess=_final_detections(build_postprocessor(cfg) if args.no_postprocess else None),
        session=make_session(path, args.threads, providers),
    )
    print(f"end to end (preprocess + model + postprocess): {timings['end_to_end'].summary()}")
    print(f"model only (onnxruntime session.run):          {timings['model'].summary()}")


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from dfine.deploy.onnx_export import ExportableDetector, export_onnx, require_onnx, simplify_onnx

    try:
        require_onnx()
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cfg, device, model, postprocessor, image_size, metadata = _load(args)
    # Sample images first: a missing dataset should fail before minutes of export on a large model.
    samples = _random_samples if args.random_inputs else _validation_samples
    images, sizes, preprocess = samples(cfg, image_size)
    output = Path(args.output) if args.output else _default_output(cfg, args)
    export_onnx(
        model,
        postprocessor,
        output,
        image_size=(image_size[0], image_size[1]),
        opset=args.opset,
        dynamic_batch=args.dynamic_batch,
        metadata=metadata,
    )
    print(
        f"wrote {output} ({metadata['dfine.weights']} weights, "
        f"{image_size[0]}x{image_size[1]}, opset {args.opset})"
    )
    if args.simplify and not simplify_onnx(output):
        print("note: --simplify skipped: onnxsim is missing or failed (pip install onnxsim)")
    reference = ExportableDetector(model, postprocessor)
    providers = _providers(device)
    passed = _check_batches(output, reference, images.to(device), sizes.to(device), args, providers)
    if args.format == "openvino":
        from dfine.cli.export_openvino import export_and_check_openvino

        passed = export_and_check_openvino(output, reference, images, sizes, args, metadata, passed)
    elif args.benchmark:
        _benchmark(output, cfg, images, sizes, preprocess, args, providers)
    if args.int8 and passed:
        from dfine.cli.export_int8 import quantize_and_evaluate

        if not quantize_and_evaluate(output, cfg, postprocessor, args, metadata):
            return 1
    if not passed:
        print(f"error: the exported model differs from PyTorch by more than --tolerance {args.tolerance:g}")
        return 1
    return 0


def _drop_sizes(preprocess: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    return lambda: {"images": preprocess()["images"]}


def _default_output(cfg: Mapping[str, Any], args: argparse.Namespace) -> Path:
    name = "model_raw.onnx" if args.no_postprocess else "model.onnx"
    folder = cfg.get("output_dir")
    return (Path(folder) if folder else Path(args.resume).parent) / name


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
