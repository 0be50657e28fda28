"""4-image Mosaic augmentation (the DEIM recipe), optional in D-FINE pipelines.

Put it first in ``ops`` (it works on PIL images) and list it in the stop-epoch policy so the last epochs see
single images::

    - {type: Mosaic, output_size: 320, rotation_range: 10, translation_range: [0.1, 0.1],
       scaling_range: [0.5, 1.5], probability: 1.0, fill_value: 0, use_cache: False}
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

from dfine.config.registry import TRANSFORMS

__all__ = ["Mosaic"]


@TRANSFORMS.register()
class Mosaic(T.Transform):
    """Tile the sample with three others in a 2 x 2 grid, then apply a random affine warp.

    Each of the four images is first resized so its shorter side is ``output_size`` (longer side capped at
    ``max_size``); the canvas is twice the largest tile in each direction. The result keeps the first sample's
    ``image_id`` and ``orig_size``; boxes and labels of all four are concatenated (add
    ``SanitizeBoundingBoxes`` after the ops that may push boxes out).

    Args:
        output_size: shorter side of each tile in pixels.
        max_size: cap on a tile's longer side, None for none.
        rotation_range: rotation in degrees, drawn from [-r, r].
        translation_range: (x, y) translation as a fraction of the canvas.
        scaling_range: (min, max) scale of the warp.
        probability: chance of applying the mosaic to a sample.
        fill_value: grey level (0..255) of the empty canvas and the warp's border.
        use_cache: draw the three partners from a cache of recent samples instead of reading them from disk.
        max_cached_images: cache length.
        random_pop: when the cache is full, drop a random entry (else the oldest).
    """

    needs_dataset = True

    def __init__(
        self,
        output_size: int = 320,
        max_size: int | None = None,
        rotation_range: float = 0,
        translation_range: Sequence[float] = (0.1, 0.1),
        scaling_range: Sequence[float] = (0.5, 1.5),
        probability: float = 1.0,
        fill_value: int = 114,
        use_cache: bool = True,
        max_cached_images: int = 50,
        random_pop: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.resize = T.Resize(size=output_size, max_size=max_size)
        self.affine = T.RandomAffine(
            degrees=rotation_range,
            translate=tuple(translation_range),
            scale=tuple(scaling_range),
            fill=fill_value,
        )
        self.probability = probability
        self.fill_value = fill_value
        self.use_cache = use_cache
        self.max_cached_images = max_cached_images
        self.random_pop = random_pop
        self._cache: list[tuple[Image.Image, dict[str, Any]]] = []

    def forward(self, *inputs: Any) -> Any:
        image, target, dataset = inputs if len(inputs) == 3 else (*inputs, None)
        # no draw at probability 1, as DEIM, so a seed gives its sequence of samples
        if self.probability < 1.0 and random.random() > self.probability:
            return image, target
        if not isinstance(image, Image.Image):
            raise TypeError("Mosaic works on PIL images: put it before ConvertPILImage in ops.")
        image, target = self.resize(image, target)
        partners = self._partners(image, target, dataset)
        canvas, boxes, labels = _tile([(image, target), *partners], self.fill_value)
        mosaic_target = dict(target)
        mosaic_target["boxes"] = boxes
        mosaic_target["labels"] = labels
        return self.affine(canvas, mosaic_target)

    def _partners(
        self, image: Image.Image, target: dict[str, Any], dataset: Any
    ) -> list[tuple[Image.Image, dict[str, Any]]]:
        if self.use_cache:
            self._cache.append((image, target))
            if len(self._cache) > self.max_cached_images:
                # Never evict the sample just added.
                self._cache.pop(random.randrange(len(self._cache) - 1) if self.random_pop else 0)
            return [self._cache[random.randrange(len(self._cache))] for _ in range(3)]
        if dataset is None:
            raise ValueError("Mosaic(use_cache=False) needs the dataset to draw partner images from.")
        indices = random.choices(range(len(dataset)), k=3)
        # a broken partner file is replaced and counted like the sample itself (see DetectionDataset)
        load = getattr(dataset, "load_or_replace", dataset.load_item)
        return [self.resize(*load(index)) for index in indices]


def _tile(
    samples: list[tuple[Image.Image, dict[str, Any]]], fill_value: int
) -> tuple[Image.Image, tv_tensors.BoundingBoxes, Tensor]:
    """Paste four samples into the quadrants of one canvas; boxes shift with their tile."""
    tile_width = max(image.width for image, _ in samples)
    tile_height = max(image.height for image, _ in samples)
    canvas = Image.new("RGB", (2 * tile_width, 2 * tile_height), (fill_value,) * 3)
    offsets = [(0, 0), (tile_width, 0), (0, tile_height), (tile_width, tile_height)]
    all_boxes, all_labels = [], []
    for (image, target), (dx, dy) in zip(samples, offsets, strict=True):
        canvas.paste(image, (dx, dy))
        boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.XYXY)
        boxes = boxes.as_subclass(Tensor).reshape(-1, 4).float()
        all_boxes.append(boxes + torch.tensor([dx, dy, dx, dy], dtype=torch.float32))
        all_labels.append(target["labels"])
    boxes = tv_tensors.BoundingBoxes(
        torch.cat(all_boxes),
        format=tv_tensors.BoundingBoxFormat.XYXY,
        canvas_size=(canvas.height, canvas.width),
    )
    return canvas, boxes, torch.cat(all_labels)
