"""Every bad input a user meets, each with its documented outcome: one table, one parametrised test.

An outcome is either a refusal (exit code 2 from ``dfine-train``, or :class:`UnreadableImageError` from the
image reader every dataset and ``dfine-predict`` share) whose message names the file or key and the fix, with
no traceback; or a correct conversion (code 0) checked pixel by pixel, with a warning where data is missing.
To add a case, append a :class:`Case` to :data:`CASES`: ``run`` does what the user does and returns
``(exit code, everything the user was shown)``.
"""

from __future__ import annotations

import copy
import errno
import io
import json
import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainer_helpers import CONFIG, TINY_MODEL, tiny_overrides

import dfine
import dfine.checkpoint
from dfine.cli import train as train_cli
from dfine.cli.common import USER_ERRORS
from dfine.data.coco import parse_coco
from dfine.data.image_checks import has_truncated_tail
from dfine.data.image_io import UnreadableImageError, load_image


@pytest.fixture(autouse=True)
def _drop_dfine_log_handlers():  # type: ignore[no-untyped-def]
    """The run's console handler writes to this test's captured stdout, closed after it: remove it then."""
    yield
    package_logger = logging.getLogger("dfine")
    for handler in [h for h in package_logger.handlers if getattr(h, "_dfine_handler", False)]:
        package_logger.removeHandler(handler)
        handler.close()


@dataclass
class Context:
    tmp_path: Path
    capsys: pytest.CaptureFixture[str]
    caplog: pytest.LogCaptureFixture
    monkeypatch: pytest.MonkeyPatch


@dataclass(frozen=True)
class Case:
    """``run`` reproduces the input; ``code`` the outcome (2 refused, 0 converted); ``says`` must be shown."""

    id: str
    run: Callable[[Context], tuple[int, str]]
    code: int
    says: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ dfine-train


def train(
    ctx: Context, *flags: str, overrides: tuple[str, ...] = (), config: Path = CONFIG
) -> tuple[int, str]:
    """``dfine-train -c CONFIG FLAGS -u <tiny run> OVERRIDES`` in this process: (exit code, stderr + log)."""
    tiny = tiny_overrides(ctx.tmp_path / "run", ctx.tmp_path / "data", epochs=1)
    code = train_cli.main(["-c", str(config), *flags, "-u", *tiny, *overrides])
    shown = ctx.capsys.readouterr()
    return code, shown.err + shown.out + ctx.caplog.text


def write(ctx: Context, name: str, content: str | bytes) -> Path:
    path = ctx.tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def config_file(ctx: Context, name: str, text: str) -> tuple[int, str]:
    return train(ctx, config=write(ctx, name, text))


def resume_from(ctx: Context, name: str, content: str | bytes | None, flag: str = "-r") -> tuple[int, str]:
    path = ctx.tmp_path / name if content is None else write(ctx, name, content)
    return train(ctx, flag, str(path))


def pickled_object(ctx: Context) -> tuple[int, str]:
    path = ctx.tmp_path / "pickled.pth"
    torch.save({"model": {}, "args": argparse_namespace()}, path)
    return train(ctx, "-r", str(path))


def argparse_namespace():  # type: ignore[no-untyped-def]
    import argparse  # what the original D-FINE's train.py leaves in its checkpoints

    return argparse.Namespace(lr=0.1)


def other_model_size(ctx: Context) -> tuple[int, str]:
    cfg = dfine.load_config(CONFIG, [*TINY_MODEL, "model.decoder.num_layers=3"])
    path = ctx.tmp_path / "other.pth"
    torch.save({"model": dfine.build_model(cfg).state_dict(), "optimizer": {}, "epoch": 1}, path)
    return train(ctx, "-r", str(path))


def existing_run(ctx: Context) -> tuple[int, str]:
    last = ctx.tmp_path / "run" / "last.pth"
    last.parent.mkdir()
    last.write_bytes(b"the previous run")
    code, shown = train(ctx)
    assert last.read_bytes() == b"the previous run", "a refused run must not touch the folder"
    return code, shown


def disk_full(ctx: Context) -> tuple[int, str]:
    """The first write of the run (best_stage1.pth, after the evaluation) meets a full disk."""
    last = ctx.tmp_path / "run" / "best_stage1.pth"
    last.parent.mkdir()
    last.write_bytes(b"the previous checkpoint")

    def no_space(obj, handle):  # type: ignore[no-untyped-def]
        handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    ctx.monkeypatch.setattr(dfine.checkpoint.torch, "save", no_space)
    code, shown = train(ctx, "--exist-ok")
    assert last.read_bytes() == b"the previous checkpoint", "a failed save must leave the old file intact"
    assert list(last.parent.glob(".*.tmp-*")) == [], "a failed save must remove its temporary file"
    return code, shown


def unwritable_output(ctx: Context) -> tuple[int, str]:
    blocker = write(ctx, "a-file", "not a folder")
    return train(ctx, overrides=(f"output_dir={blocker / 'run'}",))


# ------------------------------------------------------------------------------------------ annotation files

ANNOTATIONS = {
    "images": [
        {"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
        {"id": 2, "file_name": "b.jpg", "width": 64, "height": 48},
    ],
    "annotations": [
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 10], "area": 100, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 10], "area": 200, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
}


def annotations(ctx: Context, edit: Callable[[dict], object] | str) -> tuple[int, str]:
    """Parse an annotation file as every COCO-format dataset does: (2, message) if refused, (0, log) if read.

    ``edit`` changes a copy of a good file, or is the whole file's text.
    """
    if isinstance(edit, str):
        text = edit
    else:
        document = copy.deepcopy(ANNOTATIONS)
        edit(document)
        text = json.dumps(document)  # writes NaN/Infinity for non-finite floats, as users' scripts do
    path = write(ctx, "ann.json", text)
    with ctx.caplog.at_level(logging.WARNING):
        try:
            parse_coco(str(path))
        except USER_ERRORS as error:
            return 2, str(error)
    return 0, ctx.caplog.text


def second(section: str, **changes: object) -> Callable[[dict], None]:
    def edit(document: dict) -> None:
        document[section][1].update(changes)

    return edit


def check_truncated(ctx: Context) -> tuple[int, str]:
    """The default ``--check-data`` reads each file's tail: a cut JPEG is named (header mode, no decoding)."""
    data = encode(Image.fromarray(NOISE), "JPEG", quality=95)
    whole, cut = write(ctx, "whole.jpg", data), write(ctx, "cut.jpg", data[: len(data) * 9 // 10])
    flagged = [path for path in (whole, cut) if has_truncated_tail(str(path))]
    return (2, f"truncated: {flagged[0].name}") if flagged == [cut] else (0, str(flagged))


# ------------------------------------------------------------------------------------------ images


def image(
    ctx: Context, name: str, data: bytes, expected: np.ndarray | None, tolerance: int = 0
) -> tuple[int, str]:
    """Load ``data`` as ``name``: (2, message) if refused; (0, log) when the RGB pixels equal ``expected``."""
    path = write(ctx, name, data)
    with ctx.caplog.at_level(logging.WARNING):
        try:
            loaded = load_image(path)
        except UnreadableImageError as error:
            return 2, str(error)
    pixels = np.asarray(loaded).astype(int)
    assert loaded.mode == "RGB" and expected is not None
    assert pixels.shape == expected.shape, (pixels.shape, expected.shape)
    assert np.abs(pixels - expected).max() <= tolerance, f"max difference {np.abs(pixels - expected).max()}"
    return 0, ctx.caplog.text


def encode(picture: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


GRADIENT16 = (np.arange(8 * 8, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)  # 0..63000
COLOURS = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [250, 250, 250]]], dtype=np.uint8)  # [2, 2, 3]


def rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1).astype(int)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` (what a decompression bomb looks like) without the pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def exif_rotated() -> tuple[bytes, np.ndarray]:
    """16x8 stored, left half red, right half blue, EXIF orientation 6: upright it is 8x16, red on top."""
    stored = np.zeros((8, 16, 3), dtype=np.uint8)
    stored[:, :8] = (255, 0, 0)
    stored[:, 8:] = (0, 0, 255)
    picture = Image.fromarray(stored)
    exif = picture.getexif()
    exif[0x0112] = 6
    upright = np.zeros((16, 8, 3), dtype=int)
    upright[:8], upright[8:] = (255, 0, 0), (0, 0, 255)
    return encode(picture, "PNG", exif=exif), upright


def palette(transparent: bool) -> bytes:
    picture = Image.fromarray(COLOURS).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return encode(picture, "PNG", **({"transparency": 0} if transparent else {}))


def rgba() -> bytes:
    alpha = np.array([[255, 0], [128, 255]], dtype=np.uint8)[..., None]
    return encode(Image.fromarray(np.concatenate([COLOURS, alpha], axis=-1), mode="RGBA"), "PNG")


NOISE = np.random.default_rng(15).integers(0, 256, (128, 128, 3), dtype=np.uint8)


def truncated_jpeg(ctx: Context) -> tuple[int, str]:
    """The last tenth of a JPEG's scan data missing (an interrupted copy): the top loads, the rest is grey."""
    data = encode(Image.fromarray(NOISE), "JPEG", quality=95)
    path = write(ctx, "cut.jpg", data[: len(data) * 9 // 10])
    with ctx.caplog.at_level(logging.WARNING):
        pixels = np.asarray(load_image(path)).astype(int)
    assert pixels.shape == NOISE.shape
    complete = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(pixels[:32] - complete[:32]).max() <= 1, "the part that is present must load as it is"
    return 0, ctx.caplog.text


def cmyk() -> bytes:
    return encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100)


def float_tiff() -> bytes:
    return encode(Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), mode="F"), "TIFF")


EXIF_BYTES, EXIF_UPRIGHT = exif_rotated()
RED = np.full((8, 8, 3), (255, 0, 0), dtype=int)
BINARY = np.indices((8, 8)).sum(0) % 2 == 0

CASES = [
    # annotation files: refused naming the file and the entry, or warned about with counts and an example
    Case("annotations-not-json", lambda c: annotations(c, "{not json"), 2, ("ann.json", "not valid JSON")),
    Case(
        "annotations-without-images",
        lambda c: annotations(c, '{"annotations": []}'),
        2,
        ("ann.json", "no 'images' list"),
    ),
    Case(
        "annotations-duplicate-image-id",
        lambda c: annotations(c, second("images", id=1)),
        2,
        ("ann.json", "image id 1 appears more than once"),
    ),
    Case(
        "annotations-non-integer-image-id",
        lambda c: annotations(c, second("images", id="2")),
        2,
        ("ann.json", "images[1].id is '2'", "must be integers"),
    ),
    Case(
        "annotations-nan-box",
        lambda c: annotations(c, second("annotations", bbox=[1, float("nan"), 3, 4])),
        2,
        ("ann.json", "NaN"),
    ),
    Case(
        "annotations-three-number-box",
        lambda c: annotations(c, second("annotations", bbox=[1, 2, 3])),
        0,
        ("ann.json", "not 4 numbers", "annotation 12"),
    ),
    Case(
        "annotations-negative-box",
        lambda c: annotations(c, second("annotations", bbox=[1, 2, -3, 4])),
        0,
        ("ann.json", "zero or negative width/height"),
    ),
    Case(
        "annotations-unknown-category",
        lambda c: annotations(c, second("annotations", category_id=9)),
        0,
        ("ann.json", "category_id not in 'categories'", "category 9"),
    ),
    Case(
        "annotations-orphan",
        lambda c: annotations(c, second("annotations", image_id=77)),
        0,
        ("ann.json", "image ids that are not in 'images'"),
    ),
    Case(
        "annotations-none-at-all",
        lambda c: annotations(c, lambda d: d.update(annotations=[])),
        0,
        ("ann.json", "has no annotations at all"),
    ),
    Case("jpg-truncated-named-by-check-data", check_truncated, 2, ("cut.jpg",)),
    # images: refused with the file named, or converted exactly
    Case("jpg-zero-byte", lambda c: image(c, "empty.jpg", b"", None), 2, ("empty.jpg", "cannot decode")),
    Case("jpg-not-an-image", lambda c: image(c, "notes.jpg", b"a text file", None), 2, ("notes.jpg",)),
    Case(
        "jpg-truncated-loads-grey-with-warning",
        truncated_jpeg,
        0,
        ("cut.jpg", "truncated", "Re-copy"),
    ),
    Case(
        "png-decompression-bomb",
        lambda c: image(c, "huge.png", png_header_only(30000, 30000), None),
        2,
        ("huge.png", "too large", "resize"),
    ),
    Case(
        "tiff-float-pixels",
        lambda c: image(c, "depth.tif", float_tiff(), None),
        2,
        ("depth.tif", "floating-point", "16-bit PNG"),
    ),
    Case(
        "png-16-bit-scaled-not-clipped",
        lambda c: image(
            c,
            "deep.png",
            encode(Image.fromarray(GRADIENT16), "PNG"),
            rgb((GRADIENT16.astype(np.int64) * 255 + 32767) // 65535),
        ),
        0,
    ),
    Case(
        "png-grayscale",
        lambda c: image(
            c,
            "gray.png",
            encode(Image.fromarray(GRADIENT16 // 256).convert("L"), "PNG"),
            rgb(GRADIENT16 // 256),
        ),
        0,
    ),
    Case(
        "png-grayscale-alpha",
        lambda c: image(
            c,
            "la.png",
            encode(Image.fromarray(GRADIENT16 // 256).convert("LA"), "PNG"),
            rgb(GRADIENT16 // 256),
        ),
        0,
    ),
    Case(
        "png-1-bit",
        lambda c: image(c, "bits.png", encode(Image.fromarray(BINARY), "PNG"), rgb(BINARY * 255)),
        0,
    ),
    Case("png-rgba-alpha-dropped", lambda c: image(c, "rgba.png", rgba(), COLOURS.astype(int)), 0),
    Case("png-palette", lambda c: image(c, "pal.png", palette(False), COLOURS.astype(int)), 0),
    Case("png-palette-transparency", lambda c: image(c, "palt.png", palette(True), COLOURS.astype(int)), 0),
    Case("jpg-cmyk", lambda c: image(c, "print.jpg", cmyk(), RED, tolerance=4), 0),
    Case("png-exif-rotated", lambda c: image(c, "phone.png", EXIF_BYTES, EXIF_UPRIGHT), 0),
    # configs: the file, the key and the fix
    Case("config-missing", lambda c: train(c, config=c.tmp_path / "nope.yml"), 2, ("nope.yml", "not found")),
    Case(
        "config-yaml-syntax",
        lambda c: config_file(c, "bad.yml", "epochs: [1\n  x: y\n"),
        2,
        ("bad.yml", "not valid YAML", "line 2"),
    ),
    Case(
        "config-include-missing",
        lambda c: config_file(c, "inc.yml", "__include__: [gone.yml]\nepochs: 1\n"),
        2,
        ("gone.yml", "included from", "inc.yml"),
    ),
    Case(
        "config-typo-top-level",
        lambda c: train(c, overrides=("epoch=3",)),
        2,
        ("epoch", "Did you mean 'epochs'"),
    ),
    Case(
        "config-typo-nested",
        lambda c: train(c, overrides=("model.decoder.num_querie=3",)),
        2,
        ("model.decoder.num_querie", "Did you mean 'num_queries'"),
    ),
    Case(
        "config-wrong-type",
        lambda c: train(c, overrides=("epochs=abc",)),
        2,
        ("epochs must be an integer", "e.g. -u epochs="),
    ),
    Case("config-override-without-value", lambda c: train(c, overrides=("epochs",)), 2, ("key.sub=value",)),
    Case(
        "num-classes-below-categories",
        lambda c: train(c, overrides=("num_classes=2",)),
        2,
        ("num_classes is 2", "4 categories", "-u num_classes=4"),
    ),
    Case(
        "eval-size-too-small-for-queries",
        lambda c: train(c, overrides=("eval_spatial_size=[32, 32]", "model.decoder.num_queries=64")),
        2,
        ("eval_spatial_size", "5 encoder cells", "num_queries=64", "-u model.decoder.num_queries=5"),
    ),
    # checkpoints
    Case("resume-missing-file", lambda c: resume_from(c, "gone.pth", None), 2, ("gone.pth", "not found")),
    Case(
        "resume-text-file",
        lambda c: resume_from(c, "notes.pth", "hello\nworld\n"),
        2,
        ("notes.pth", "not a PyTorch checkpoint", "b'hello"),
    ),
    Case(
        "resume-empty-file",
        lambda c: resume_from(c, "empty.pth", b""),
        2,
        ("empty.pth", "truncated or corrupt"),
    ),
    Case(
        "tune-text-file",
        lambda c: resume_from(c, "notes.pth", "hello\n", flag="-t"),
        2,
        ("notes.pth", "not a PyTorch checkpoint"),
    ),
    Case(
        "resume-pickled-object",
        pickled_object,
        2,
        ("pickled.pth", "pickled Python object", "argparse.Namespace", "weights_only=True"),
    ),
    Case(
        "resume-other-model-size",
        other_model_size,
        2,
        ("does not fit the model", "not in the model", "decoder.decoder.layers.2"),
    ),
    # the output folder
    Case("output-dir-unwritable", unwritable_output, 2, ("a-file", "not writable", "--output-dir")),
    Case(
        "output-dir-holds-a-run",
        existing_run,
        2,
        ("already holds a run", "last.pth", "-r auto", "--output-dir", "--exist-ok"),
    ),
    Case(
        "disk-full-during-save",
        disk_full,
        2,
        ("no space left", "best_stage1.pth", "still holds the previous checkpoint", "-r auto"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_has_its_documented_outcome(
    case: Case,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, shown = case.run(Context(tmp_path, capsys, caplog, monkeypatch))
    assert code == case.code, shown[-3000:]
    assert "Traceback" not in shown, shown[-3000:]
    missing = [part for part in case.says if part not in shown]
    assert not missing, f"the message lacks {missing}:\n{shown[:1500]}"


def test_the_table_covers_at_least_25_bad_inputs() -> None:
    assert len({case.id for case in CASES}) == len(CASES) >= 25
