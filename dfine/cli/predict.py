"""``dfine-predict``: detect objects in an image, a folder of images or a video with a trained checkpoint.

Writes each picture with its boxes, class names and scores drawn (a video as an annotated .mp4) into
--output, plus one COCO-style results file (predictions.json: image_id, file_name, category_id, name,
bbox [x, y, w, h] in pixels, score; video entries add frame; image_id numbers the pictures 1, 2, ... in
the order written), and prints one line per picture. Pictures are preprocessed with the config's
val_dataloader transforms, as in evaluation. Class names come from the checkpoint's label map (COCO names
for COCO configs without one).

Examples:
    dfine-predict -c configs/quickstart.yml -r output/quickstart/best.pth --input shapes/
    dfine-predict -c CFG -r CKPT --input street.jpg --threshold 0.3 --output output/street
    dfine-predict -c CFG -r CKPT --input clip.mp4 -d cuda    # videos need: pip install "dfine[video]"
    dfine-predict -c CFG -r output/quickstart/model.xml --input shapes/   # the exported OpenVINO IR / .onnx
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

from dfine.cli.common import add_config_arguments, config_from_args, run_cli
from dfine.data.image_io import UnreadableImageError, load_image
from dfine.inference.drawing import draw_detections, save_image
from dfine.inference.predictor import PredictInputError, Prediction, Predictor

__all__ = ["VideoFrames", "VideoWriter", "build_parser", "collect_inputs", "is_video", "main"]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"})
_VIDEO_INSTALL_HINT = 'pip install "dfine[video]" (in a checkout: pip install -e ".[video]")'


# ----------------------------------------------------------------------------------------------------- inputs
def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a video suffix (``.mp4``, ``.avi``, ``.mov``, ...)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def collect_inputs(path: str | os.PathLike) -> list[Path]:
    """The files to predict on: ``path`` itself, or the images and videos directly inside a folder, sorted.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        PredictInputError: the folder holds no image or video (sub-folders are not searched).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"input not found: {path} (resolved to {path.resolve()}); "
            "give an image, a folder of images or a video"
        )
    if not path.is_dir():
        return [path]
    files = sorted(
        p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES
    )
    if not files:
        raise PredictInputError(
            f"{path} holds no images or videos "
            f"(looked for {', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))} "
            "directly inside it; sub-folders are not searched): point --input at the folder of pictures"
        )
    return files


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as error:
        raise PredictInputError(f"reading and writing videos needs OpenCV: {_VIDEO_INSTALL_HINT}") from error
    return cv2


class VideoFrames:
    """The frames of a video file as RGB PIL images (needs OpenCV, the ``video`` extra).

    Attributes:
        fps: frames per second (25 when the file does not say).
        size: (width, height) in pixels.
        num_frames: frame count the container declares (0 when unknown).

    Raises:
        PredictInputError: OpenCV is not installed, or the file cannot be opened as a video.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self._cv2 = cv2 = _import_cv2()
        self.path = Path(path)
        self._capture = cv2.VideoCapture(str(self.path))
        if not self._capture.isOpened():
            raise PredictInputError(f"cannot open video {self.path}: not a video OpenCV can decode")
        self.fps = float(self._capture.get(cv2.CAP_PROP_FPS)) or 25.0
        self.size = (
            int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        self.num_frames = max(0, int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT)))

    def __iter__(self) -> Iterator[Image.Image]:
        while True:
            ok, frame = self._capture.read()  # BGR uint8 [H, W, 3]
            if not ok:
                return
            yield Image.fromarray(self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        self._capture.release()


class VideoWriter:
    """Write uint8 [3, H, W] RGB pictures as an ``.mp4`` (``mp4v`` codec) through OpenCV."""

    def __init__(self, path: str | os.PathLike, fps: float, size: tuple[int, int]) -> None:
        self._cv2 = cv2 = _import_cv2()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
        if not self._writer.isOpened():
            raise PredictInputError(f"cannot write video {self.path}: OpenCV has no mp4v encoder here")

    def write(self, picture: Tensor) -> None:
        frame = picture.permute(1, 2, 0).contiguous().numpy()  # [H, W, 3] RGB
        self._writer.write(self._cv2.cvtColor(frame, self._cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self._writer.release()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfine-predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument(
        "-r",
        "--resume",
        "--checkpoint",
        dest="resume",
        required=True,
        metavar="CKPT",
        help="weights: a .pth, an HF folder, or an exported model.onnx / OpenVINO model.xml",
    )
    parser.add_argument(
        "-i", "--input", required=True, metavar="PATH", help="an image, a folder of images, or a video"
    )
    parser.add_argument(
        "-o",
        "--output",
        default="output/predict",
        metavar="DIR",
        help="where to write (default: %(default)s)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="keep detections scoring at least this (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="pictures per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--save-json", default=None, metavar="FILE", help="results file (default: OUTPUT/predictions.json)"
    )
    return parser


def _output_paths(inputs: Sequence[Path], output: Path) -> dict[Path, Path]:
    """Where each input's drawn picture goes: ``<stem>.jpg`` (``.png`` for PNG input, ``.mp4`` for videos)."""
    paths: dict[Path, Path] = {}
    used: set[str] = set()
    for path in inputs:
        suffix = ".mp4" if is_video(path) else (".png" if path.suffix.lower() == ".png" else ".jpg")
        name = path.stem + suffix
        if name in used:  # photo.jpg and photo.jpeg in one folder
            name = f"{path.stem}_{path.suffix.lstrip('.').lower()}{suffix}"
        used.add(name)
        target = output / name
        if target.resolve() == path.resolve():
            raise PredictInputError(
                f"writing {target} would overwrite the input {path}; choose another --output folder"
            )
        paths[path] = target
    return paths


class _Run:
    """One ``dfine-predict`` invocation: draws, writes and records what the predictor finds."""

    def __init__(self, predictor: Predictor, outputs: dict[Path, Path], batch_size: int) -> None:
        self.predictor = predictor
        self.outputs = outputs
        self.batch_size = batch_size
        self.records: list[dict[str, Any]] = []
        self.num_pictures = 0
        self.skipped: list[Path] = []
        # Video rows read "clip.mp4 (1234 frames)".
        names = [path.name + (" (00000 frames)" if is_video(path) else "") for path in outputs]
        self.width = min(48, max(len("file"), *(len(name) for name in names)))
        print(f"{'file':<{self.width}}  {'detections':>10}  best")

    def _row(self, name: str, count: int, best: str) -> None:
        print(f"{name:<{self.width}}  {count:>10}  {best}", flush=True)

    def _draw(self, image: Image.Image, prediction: Prediction) -> Tensor:
        return draw_detections(
            pil_to_tensor(image),
            prediction.boxes,
            prediction.labels,
            prediction.scores,
            self.predictor.class_names,
        )

    def _record(self, prediction: Prediction, **extra: Any) -> None:
        self.num_pictures += 1
        self.records.extend(prediction.to_coco_results(self.num_pictures, **extra))

    def images(self, paths: Sequence[Path], strict: bool) -> None:
        """Predict on image files in batches; unreadable ones raise when ``strict``, else are skipped."""
        for start in range(0, len(paths), self.batch_size):
            loaded = []
            for path in paths[start : start + self.batch_size]:
                try:
                    loaded.append((path, load_image(path)))
                except UnreadableImageError as error:
                    if strict:
                        raise UnreadableImageError(f"{error}; re-save it as JPEG or PNG") from error
                    logger.warning("skipping %s; re-save it as JPEG or PNG to include it", error)
                    self.skipped.append(path)
            predictions = self.predictor.predict([image for _, image in loaded]) if loaded else []
            for (path, image), prediction in zip(loaded, predictions, strict=True):
                save_image(self._draw(image, prediction), self.outputs[path])
                self._record(prediction, file_name=path.name)
                self._row(path.name, len(prediction), prediction.summary())

    def video(self, path: Path) -> None:
        """Predict on every frame of a video and write the annotated frames as ``.mp4``."""
        frames = VideoFrames(path)
        writer = VideoWriter(self.outputs[path], frames.fps, frames.size)
        counts: Counter[str] = Counter()
        num_frames = 0
        try:
            batch: list[Image.Image] = []
            for frame in itertools.chain(frames, [None]):  # None flushes the last batch
                if frame is not None:
                    batch.append(frame)
                if batch and (frame is None or len(batch) == self.batch_size):
                    for image, prediction in zip(batch, self.predictor.predict(batch), strict=True):
                        writer.write(self._draw(image, prediction))
                        self._record(prediction, file_name=path.name, frame=num_frames)
                        counts.update(prediction.names)
                        num_frames += 1
                    batch = []
        finally:
            frames.close()
            writer.close()
        common = ", ".join(f"{name} x{count}" for name, count in counts.most_common(3)) or "-"
        self._row(f"{path.name} ({num_frames} frames)", sum(counts.values()), common)


def _predictor(cfg: Any, args: argparse.Namespace) -> Predictor:
    """A checkpoint / HF folder in PyTorch, or an exported ``.onnx`` / OpenVINO ``.xml`` in its runtime."""
    if Path(args.resume).suffix in (".onnx", ".xml"):
        from dfine.deploy.exported_predictor import ExportedPredictor

        return ExportedPredictor(cfg, args.resume, threshold=args.threshold)
    return Predictor(cfg, args.resume, threshold=args.threshold)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, [f"device={args.device}"] if args.device else [])
    if args.batch_size < 1:
        raise PredictInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    # Inputs and outputs are checked before the model is built, so a typo fails at once.
    inputs = collect_inputs(args.input)
    output = Path(args.output)
    outputs = _output_paths(inputs, output)
    if any(is_video(path) for path in inputs):
        _import_cv2()  # before any picture is written
    run = _Run(_predictor(cfg, args), outputs, args.batch_size)
    run.images([path for path in inputs if not is_video(path)], strict=not Path(args.input).is_dir())
    for path in inputs:
        if is_video(path):
            run.video(path)
    json_path = Path(args.save_json) if args.save_json else output / "predictions.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # One detection per line: readable, and still a JSON list any COCO tool loads.
    json_path.write_text("[\n" + ",\n".join(json.dumps(record) for record in run.records) + "\n]\n")
    skipped = f"; skipped {len(run.skipped)} unreadable file(s)" if run.skipped else ""
    print(f"{len(run.records)} detections in {run.num_pictures} pictures: {output}/, {json_path}{skipped}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv, user_errors=(PredictInputError,))


if __name__ == "__main__":
    sys.exit(main())
