"""Detection transforms on torchvision.transforms.v2, registered under the original D-FINE configs' names.

Every transform takes and returns ``(image, target)`` where ``target["boxes"]`` is a
``tv_tensors.BoundingBoxes``: geometric ops move boxes with the pixels. The torchvision classes are registered
as they are (their arguments are the config's arguments); the few below add what D-FINE needs:
``RandomIoUCrop(p)``, ``Resize(keep_ratio)`` letterboxing, ``ConvertPILImage`` and ``ConvertBoxes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchvision
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import Tensor
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors

from dfine.config.registry import TRANSFORMS, ConfigError

__all__ = [
    "ConvertBoxes",
    "ConvertPILImage",
    "EmptyTransform",
    "RandomIoUCrop",
    "Resize",
    "letterbox_geometry",
    "original_frame_size",
]

# Used unchanged: the config block is exactly the torchvision constructor's arguments.
for _cls in (
    T.RandomPhotometricDistort,
    T.RandomZoomOut,
    T.RandomHorizontalFlip,
    T.SanitizeBoundingBoxes,
    T.RandomCrop,
):
    TRANSFORMS.register(_cls.__name__)(_cls)


@TRANSFORMS.register()
class EmptyTransform(T.Transform):
    """Returns its input unchanged (what an empty ``ops`` list means)."""

    def forward(self, *inputs: Any) -> Any:
        return inputs if len(inputs) > 1 else inputs[0]


@TRANSFORMS.register()
class RandomIoUCrop(T.RandomIoUCrop):
    """SSD-style crop keeping boxes whose centre falls inside (torchvision's), applied with probability ``p``.

    Follow it with ``SanitizeBoundingBoxes``: boxes outside the crop are zeroed, not removed.
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        sampler_options: Sequence[float] | None = None,
        trials: int = 40,
        p: float = 1.0,
    ) -> None:
        options = list(sampler_options) if sampler_options is not None else None
        super().__init__(min_scale, max_scale, min_aspect_ratio, max_aspect_ratio, options, trials)
        self.p = p

    def forward(self, *inputs: Any) -> Any:
        if torch.rand(1).item() >= self.p:
            return inputs if len(inputs) > 1 else inputs[0]
        return super().forward(*inputs)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """torchvision's crop search with its ``trials`` drawn at once (same distribution, ~10x faster).

        Per drawn IoU option, the first of ``trials`` random crops that has the allowed aspect ratio, a box
        centre inside and a box overlapping it by at least the option's IoU wins; none: draw another option.
        """
        height, width = T.query_size(flat_inputs)
        found = T.get_bounding_boxes(flat_inputs)
        boxes = F.convert_bounding_box_format(
            found.as_subclass(Tensor), old_format=found.format, new_format=tv_tensors.BoundingBoxFormat.XYXY
        ).reshape(-1, 4)
        if len(boxes) == 0:
            return {}  # no crop can contain a box centre: torchvision also ends up leaving the image as it is
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2]
        while True:
            min_iou = self.options[int(torch.randint(low=0, high=len(self.options), size=(1,)))]
            if min_iou >= 1.0:  # the "leave the image as it is" option
                return {}
            scale = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(self.trials, 2)
            new_w, new_h = (width * scale[:, 0]).floor(), (height * scale[:, 1]).floor()  # [T]
            position = torch.rand(self.trials, 2)
            left, top = (
                ((width - new_w) * position[:, 0]).floor(),
                ((height - new_h) * position[:, 1]).floor(),
            )
            right, bottom = left + new_w, top + new_h
            ratio = new_w / new_h.clamp(min=1)
            fits = (
                (ratio >= self.min_aspect_ratio)
                & (ratio <= self.max_aspect_ratio)
                & (new_w > 0)
                & (new_h > 0)
            )
            crops = torch.stack([left, top, right, bottom], dim=1)  # [T, 4]
            inside = (
                (centres[None, :, 0] > left[:, None])
                & (centres[None, :, 0] < right[:, None])
                & (centres[None, :, 1] > top[:, None])
                & (centres[None, :, 1] < bottom[:, None])
            )  # [T, N]
            iou = torchvision.ops.box_iou(crops, boxes.to(crops.dtype))  # [T, N]
            best = torch.where(inside, iou, torch.full_like(iou, -1.0)).amax(dim=1)  # [T]
            good = torch.nonzero(fits & inside.any(dim=1) & (best >= min_iou)).flatten()
            if len(good):
                trial = int(good[0])
                return {
                    "top": int(top[trial]),
                    "left": int(left[trial]),
                    "height": int(new_h[trial]),
                    "width": int(new_w[trial]),
                    "is_within_crop_area": inside[trial],
                }


def letterbox_geometry(
    height: int, width: int, out_height: int, out_width: int
) -> tuple[float, tuple[int, int], list[int]]:
    """Scale, resized size and padding fitting an image into ``out_height x out_width``, aspect ratio kept.

    The image goes to the top-left corner and the padding to the right and bottom, so normalised box
    coordinates map back to original pixels by one multiplication (see `original_frame_size`).

    Returns:
        scale (output pixels per input pixel), ``(new_height, new_width)``, and padding
        ``[left, top, right, bottom]`` in output pixels.
    """
    scale = min(out_height / height, out_width / width)
    new_height = min(out_height, max(1, round(height * scale)))
    new_width = min(out_width, max(1, round(width * scale)))
    return scale, (new_height, new_width), [0, 0, out_width - new_width, out_height - new_height]


@TRANSFORMS.register()
class Resize(T.Resize):
    """torchvision's Resize (``size`` is ``[height, width]``), plus an aspect-preserving letterbox.

    Args:
        size: output ``[height, width]`` (an int: square when ``keep_ratio``, shorter side otherwise).
        interpolation: ``bilinear`` (default), ``nearest``, ``bicubic``, ...
        max_size, antialias: as torchvision's Resize.
        keep_ratio: scale to fit inside ``size`` without distortion and pad the right and bottom with
            ``fill``. The target gains ``letterbox_size`` (w, h of the padded input in original-image pixels)
            so predictions map back exactly.
        fill: padding value (0..255 for PIL images, like ``RandomZoomOut``'s ``fill``).
    """

    def __init__(
        self,
        size: int | Sequence[int] | None,
        interpolation: str | int = "bilinear",
        max_size: int | None = None,
        antialias: bool | None = True,
        keep_ratio: bool = False,
        fill: float = 0,
    ) -> None:
        super().__init__(size, interpolation=interpolation, max_size=max_size, antialias=antialias)
        self.keep_ratio = keep_ratio
        self.fill = fill
        if keep_ratio:
            if size is None or max_size is not None:
                raise ConfigError("Resize(keep_ratio=True) needs size [height, width] and no max_size.")
            self.out_size = (self.size[0], self.size[-1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if not self.keep_ratio:
            return {}
        height, width = T.query_size(flat_inputs)
        scale, new_size, padding = letterbox_geometry(height, width, *self.out_size)
        return {"scale": scale, "new_size": new_size, "padding": padding}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not self.keep_ratio:
            return super().transform(inpt, params)
        resized = self._call_kernel(
            F.resize,
            inpt,
            list(params["new_size"]),
            interpolation=self.interpolation,
            antialias=self.antialias,
        )
        fill = None if isinstance(inpt, tv_tensors.BoundingBoxes) else self.fill
        return self._call_kernel(F.pad, resized, padding=params["padding"], fill=fill)

    def forward(self, *inputs: Any) -> Any:
        outputs = super().forward(*inputs)
        target = outputs[1] if isinstance(outputs, tuple) and len(outputs) > 1 else None
        if self.keep_ratio and isinstance(target, dict):
            flat = tree_flatten(inputs if len(inputs) > 1 else inputs[0])[0]
            sized = [
                item for item, needed in zip(flat, self._needs_transform_list(flat), strict=True) if needed
            ]
            height, width = T.query_size(sized)
            scale = letterbox_geometry(height, width, *self.out_size)[0]
            out_height, out_width = self.out_size
            target["letterbox_size"] = torch.tensor(
                [out_width / scale, out_height / scale], dtype=torch.float32
            )
        return outputs


def original_frame_size(target: dict[str, Tensor]) -> Tensor:
    """(w, h) turning normalised boxes into original-image pixels: ``letterbox_size`` or ``orig_size``."""
    if "letterbox_size" in target:
        return target["letterbox_size"]
    return target["orig_size"].to(torch.float32)


@TRANSFORMS.register()
class ConvertPILImage(T.Transform):
    """PIL image -> ``tv_tensors.Image`` [3, H, W]: ``dtype: float32`` (else uint8) and ``scale`` to 0..1."""

    _transformed_types = (Image.Image,)

    def __init__(self, dtype: str = "float32", scale: bool = True) -> None:
        super().__init__()
        if dtype not in ("float32", "uint8"):
            raise ConfigError(f"ConvertPILImage dtype must be 'float32' or 'uint8', got {dtype!r}.")
        self.dtype = dtype
        self.scale = scale

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        image = F.pil_to_tensor(inpt)
        if self.dtype == "float32":
            image = image.float()
            if self.scale:
                image = image.div_(255.0)
        return tv_tensors.Image(image)


@TRANSFORMS.register()
class ConvertBoxes(T.Transform):
    """Change the box format (``fmt``: xyxy, xywh or cxcywh) and optionally ``normalize`` by the image size.

    Normalised boxes come out as a plain float tensor [N, 4] (they are no longer pixels of a canvas), so put
    this op last.
    """

    _transformed_types = (tv_tensors.BoundingBoxes,)

    def __init__(self, fmt: str = "", normalize: bool = False) -> None:
        super().__init__()
        if fmt and fmt.upper() not in tv_tensors.BoundingBoxFormat.__members__:
            raise ConfigError(f"ConvertBoxes fmt must be one of xyxy, xywh, cxcywh, got {fmt!r}.")
        self.fmt = fmt
        self.normalize = normalize

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        boxes = inpt
        if self.fmt:
            boxes = F.convert_bounding_box_format(
                boxes, new_format=tv_tensors.BoundingBoxFormat[self.fmt.upper()]
            )
        if self.normalize:
            height, width = boxes.canvas_size
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            return boxes.as_subclass(Tensor).float() / scale
        return boxes
