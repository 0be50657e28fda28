"""load_image / read_image_size: EXIF orientation as Pillow's own ImageOps.exif_transpose applies it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from dfine.data.image_io import load_image, read_image_size


def _oriented_jpeg(path: Path, orientation: int | None) -> None:
    """48 wide x 32 high, a different colour in each quadrant, with the given EXIF orientation tag."""
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:16, :24], pixels[:16, 24:], pixels[16:, :24], pixels[16:, 24:] = (
        (255, 0, 0),
        (0, 255, 0),
        (0, 0, 255),
        (255, 255, 0),
    )
    picture = Image.fromarray(pixels)
    exif = picture.getexif()
    if orientation is not None:
        exif[0x0112] = orientation
    picture.save(path, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [None, 1, 2, 3, 4, 5, 6, 7, 8])
def test_every_exif_orientation_loads_as_pillow_turns_it_upright(
    tmp_path: Path, orientation: int | None
) -> None:
    # Our table is kept instead of calling exif_transpose (which also rewrites the EXIF block and raises on
    # some malformed phone EXIF); Pillow's function is the oracle for the pixels.
    path = tmp_path / "picture.jpg"
    _oriented_jpeg(path, orientation)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    loaded = load_image(path)
    assert np.array_equal(np.asarray(loaded), expected)
    assert read_image_size(path) == loaded.size == (expected.shape[1], expected.shape[0])


def test_an_unreadable_exif_block_loads_the_picture_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Older Pillow versions raise on some malformed phone EXIF; such a picture must still load.
    path = tmp_path / "phone.jpg"
    _oriented_jpeg(path, 6)

    def broken(self: Image.Image) -> Image.Exif:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    assert load_image(path).size == read_image_size(path) == (48, 32)
