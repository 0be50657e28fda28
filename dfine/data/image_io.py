"""Reading images the one way every dataset, the dataset check and prediction share.

EXIF orientation is applied on load, so a phone photo is seen upright, in the frame a person annotated it in,
and the size used to check and normalise boxes is that upright size.

Every picture becomes 8-bit RGB, never silently wrong: grayscale is repeated over the channels, palette and
CMYK pictures are converted by Pillow, alpha is dropped (as the original D-FINE does), 16-bit pictures are
scaled to 0..255 (not clipped, which turns them nearly white), and 32-bit integer or float pictures, whose
range is unknown, are refused with a message. A picture over Pillow's decompression-bomb limit is refused with
its size and the fix, not a traceback.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

__all__ = ["UnreadableImageError", "exif_orientation", "load_image", "read_image_size", "try_read_image_size"]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5..8 turn the picture by 90 degrees: width and height swap.
_SWAPS_SIDES = {5, 6, 7, 8}
# How to turn a stored picture with EXIF orientation 2..8 upright (EXIF 2.3, tag 0x0112).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_truncated_lock = threading.Lock()
_warned_truncated: set[str] = set()


class UnreadableImageError(OSError):
    """An image file exists but cannot be decoded; the message names the file."""


def exif_orientation(image: Image.Image) -> int:
    """EXIF orientation tag (1..8) of an opened image, 1 when absent or unreadable."""
    try:
        value = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block must not make the picture unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Upright ``(width, height)`` in pixels from the file header, without decoding the pixels.

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableImageError: the header is not an image PIL can identify.
    """
    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if exif_orientation(image) in _SWAPS_SIDES:
                width, height = height, width
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(_too_large(path, error)) from error
    except (OSError, ValueError) as error:
        raise UnreadableImageError(f"cannot read image {path}: {error}") from error
    return width, height


def _too_large(path: str, error: Exception) -> str:
    return (
        f"image {path} is too large to decode safely ({error}); resize it (e.g. to under 10000 pixels a "
        "side), or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"
    )


def try_read_image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """`read_image_size`, or None for a missing or unreadable file (the dataset check reports those)."""
    try:
        return read_image_size(path)
    except (FileNotFoundError, UnreadableImageError):
        return None


def load_image(path: str | os.PathLike, *, allow_truncated: bool = True) -> Image.Image:
    """Decode ``path`` as an upright RGB PIL image.

    Args:
        path: image file.
        allow_truncated: a file whose end is missing (an interrupted copy) loads with the missing part grey
            and one warning naming the file, instead of stopping training. False raises instead.

    Returns:
        RGB image, EXIF orientation applied (size = `read_image_size`).

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableImageError: the file cannot be decoded (not an image, or truncated with
            ``allow_truncated=False``).
    """
    path = os.fspath(path)
    try:
        image = _decode(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(_too_large(path, error)) from error
    except (UnidentifiedImageError, ValueError) as error:
        raise UnreadableImageError(f"cannot decode image {path}: {error}") from error
    except OSError as error:
        if not (allow_truncated and "truncated" in str(error).lower()):
            raise UnreadableImageError(f"cannot decode image {path}: {error}") from error
        image = _decode_truncated(path, error)
    return image


def _decode(path: str) -> Image.Image:
    image = Image.open(path)
    try:
        orientation = exif_orientation(image)
        image.load()  # also closes the file of single-frame images
    except BaseException:
        image.close()
        raise
    image = _to_rgb(image, path)
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    return image


def _to_rgb(image: Image.Image, path: str) -> Image.Image:
    """8-bit RGB from any Pillow mode; 16-bit samples are scaled by 255/65535 (a convert would clip them)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        samples = np.asarray(image)  # [H, W]
        # 32-bit integers are 16-bit PNGs with older Pillow when they fit 0..65535; floats have no scale.
        if image.mode == "F" or samples.min() < 0 or samples.max() > 65535:
            kind = "floating-point" if image.mode == "F" else "32-bit"
            raise UnreadableImageError(
                f"cannot use image {path}: its pixels are {kind} (range {samples.min()}..{samples.max()}), "
                "which has no fixed scale to 8-bit colour; save it as an 8- or 16-bit PNG or as JPEG"
            )
        scaled = (samples.astype(np.int64) * 255 + 32767) // 65535
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")  # L, LA, 1, P, PA, RGBA, CMYK, YCbCr, LAB, HSV


def _decode_truncated(path: str, error: OSError) -> Image.Image:
    if path not in _warned_truncated:
        _warned_truncated.add(path)
        logger.warning(
            "%s is truncated (%s): its missing part loads grey. Re-copy the file to fix it.", path, error
        )
    # PIL only offers a process-wide switch for this; hold it for the one decode.
    with _truncated_lock:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            return _decode(path)
        except OSError as second_error:
            raise UnreadableImageError(f"cannot decode image {path}: {second_error}") from second_error
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous
