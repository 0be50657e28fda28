"""Record the original D-FINE criterion's loss terms, so CI re-checks our criterion without the original.

The original N model (a tiny variant: 30 queries, 8 classes, 128x128 images) gets realistic weights (its own
initialisation plus seeded noise of std 0.02 on every parameter, BatchNorm statistics from two random batches:
freshly initialised heads would make the distillation loss exactly 0), runs once in training mode, and the
original criterion scores its output dict. The fixture stores two batches' output dicts (detached tensors,
without the ``teacher_*`` entries, which alias other outputs and are re-linked on loading) and targets, the
original's criterion settings, and its loss terms in three cases:

* ``regular``: batch ``boxes`` (4, 0 and 2 boxes) without the denoising entries (denoising off), 20 terms;
* ``denoising``: the same batch with ``dn_outputs``/``dn_pre_outputs``/``dn_meta``, 38 terms;
* ``no_boxes``: batch ``no_boxes``, where no image has a box (the original returns empty denoising outputs).

Usage (with the original repository checked out, e.g. ``git clone https://github.com/Peterande/D-FINE``)::

    DFINE_ORIG_DIR=../D-FINE python tools/make_criterion_fixture.py
    # writes tests/fixtures/criterion_parity.pt (~0.5 MB); tests/losses/test_criterion.py reads it

The helpers (:func:`build_original`, :func:`perturb_weights`, :func:`clone_outputs`) are also used by the
live parity tests and by tools/benchmark_criterion.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
TINY = {"num_classes": 8, "num_queries": 30, "num_denoising": 20, "image_size": 128}
TEACHER_KEYS = ("teacher_corners", "teacher_logits")


def find_original(path: str | None = None) -> Path:
    """The original checkout (``path``, env ``DFINE_ORIG_DIR`` or /work/orig), put on ``sys.path``."""
    orig = Path(path or os.environ.get("DFINE_ORIG_DIR", "/work/orig")).expanduser().resolve()
    if not (orig / "src" / "zoo" / "dfine").is_dir():
        raise FileNotFoundError(f"no original D-FINE checkout at {orig}: pass --orig or set DFINE_ORIG_DIR")
    if str(orig) not in sys.path:
        sys.path.insert(0, str(orig))
    return orig


def build_original(
    orig: Path, num_classes: int = 80, num_queries: int = 300, num_denoising: int = 100
) -> tuple[nn.Module, nn.Module]:
    """The original N-size model and its criterion (``YAMLConfig``, HGNetv2 without pretrained weights)."""
    from src.core import YAMLConfig  # the original's config system

    cfg = YAMLConfig(
        str(orig / "configs/dfine/dfine_hgnetv2_n_coco.yml"),
        HGNetv2={"pretrained": False},
        DFINETransformer={"num_queries": num_queries, "num_denoising": num_denoising},
        num_classes=num_classes,
    )
    return cfg.model, cfg.criterion


def make_targets(sizes: list[int], num_classes: int, seed: int) -> list[dict[str, Tensor]]:
    """Seeded targets: ``labels`` [N] int64 and ``boxes`` [N, 4] cxcywh inside the image."""
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for size in sizes:
        centre = 0.25 + 0.5 * torch.rand(size, 2, generator=generator)
        extent = 0.05 + 0.4 * torch.rand(size, 2, generator=generator)
        labels = torch.randint(0, num_classes, (size,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat((centre, extent), dim=1)})
    return targets


@torch.no_grad()
def perturb_weights(model: nn.Module, image_size: int, seed: int = SEED) -> None:
    """Seeded noise (std 0.02) on every float parameter except ``up``/``reg_scale``, then BatchNorm statistics
    from two random training-mode batches."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and name.rpartition(".")[2] not in ("up", "reg_scale"):
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    model.train()
    for _ in range(2):
        images = torch.rand(2, 3, image_size, image_size, generator=generator)
        model(images, make_targets([2, 1], 1, seed))


def run_model(model: nn.Module, sizes: list[int], num_classes: int, image_size: int, seed: int) -> tuple:
    """One training-mode forward on seeded images and targets; returns ``(outputs, targets)``."""
    targets = make_targets(sizes, num_classes, seed)
    images = torch.rand(len(sizes), 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the denoising noise comes from the global generator
    model.train()
    return model(images, targets), targets


def clone_outputs(value: Any, requires_grad: bool = True, _memo: dict | None = None) -> Any:
    """Deep copy of an output dict with leaf float tensors; tensors sharing memory stay one tensor (the
    ``teacher_*`` entries alias the final layer's outputs, and the criteria rely on that)."""
    memo = {} if _memo is None else _memo
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            return value.clone()
        key = (value.data_ptr(), tuple(value.shape), value.stride())
        if key not in memo:
            memo[key] = value.detach().clone().requires_grad_(requires_grad and value.requires_grad)
        return memo[key]
    if isinstance(value, Mapping):
        return {k: clone_outputs(v, requires_grad, memo) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_outputs(v, requires_grad, memo) for v in value)
    return value


def pack_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Plain, ``weights_only``-loadable copy: detached contiguous tensors, no ``teacher_*`` aliases."""

    def pack(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.detach().clone().contiguous()
        if isinstance(value, Mapping):
            return {k: pack(v) for k, v in value.items() if k not in TEACHER_KEYS}
        if isinstance(value, (list, tuple)):
            return [pack(v) for v in value]
        return value

    return pack(outputs)


def unpack_outputs(packed: Mapping[str, Any], keep_denoising: bool = True) -> dict[str, Any]:
    """The inverse of :func:`pack_outputs`: fresh leaf tensors that require grad, ``teacher_*`` re-linked to
    the final layer's tensors (as the model hands them over); ``keep_denoising=False`` drops the ``dn_*``
    entries."""

    def leaf(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.clone().requires_grad_(value.is_floating_point() and value.dim() > 1)
        if isinstance(value, Mapping):
            return {k: leaf(v) for k, v in value.items()}
        if isinstance(value, list):
            return [leaf(v) for v in value]
        return value

    outputs = leaf({k: v for k, v in packed.items() if keep_denoising or not k.startswith("dn_")})
    for aux in outputs["aux_outputs"]:
        aux["teacher_corners"], aux["teacher_logits"] = outputs["pred_corners"], outputs["pred_logits"]
    layers = outputs.get("dn_outputs", [])
    for layer in layers:
        layer["teacher_corners"] = layers[-1]["pred_corners"]
        layer["teacher_logits"] = layers[-1]["pred_logits"]
    return outputs


def without_denoising(outputs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in outputs.items() if not k.startswith("dn_")}


def criterion_settings(criterion: nn.Module) -> dict[str, Any]:
    """The original criterion's settings in our config shape (the matcher block nested)."""
    matcher = criterion.matcher
    return {
        "weight_dict": {k: float(v) for k, v in criterion.weight_dict.items()},
        "losses": list(criterion.losses),
        "alpha": float(criterion.alpha),
        "gamma": float(criterion.gamma),
        "num_classes": int(criterion.num_classes),
        "reg_max": int(criterion.reg_max),
        "matcher": {
            "weight_dict": {
                "cost_class": float(matcher.cost_class),
                "cost_bbox": float(matcher.cost_bbox),
                "cost_giou": float(matcher.cost_giou),
            },
            "use_focal_loss": bool(matcher.use_focal_loss),
            "alpha": float(matcher.alpha),
            "gamma": float(matcher.gamma),
        },
    }


def original_terms(criterion: nn.Module, outputs: Mapping[str, Any], targets: list) -> dict[str, Tensor]:
    losses = criterion(clone_outputs(outputs), targets)
    return {k: v.detach().clone() for k, v in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--orig", default=None, help="original checkout (default: $DFINE_ORIG_DIR or /work/orig)"
    )
    parser.add_argument("--out", default=str(ROOT / "tests/fixtures/criterion_parity.pt"))
    args = parser.parse_args()
    orig = find_original(args.orig)
    model, criterion = build_original(orig, TINY["num_classes"], TINY["num_queries"], TINY["num_denoising"])
    perturb_weights(model, TINY["image_size"])
    outputs, targets = run_model(model, [4, 0, 2], TINY["num_classes"], TINY["image_size"], seed=1)
    empty_outputs, empty_targets = run_model(model, [0, 0], TINY["num_classes"], TINY["image_size"], seed=2)
    batches = {
        "boxes": {"outputs": pack_outputs(outputs), "targets": targets},
        "no_boxes": {"outputs": pack_outputs(empty_outputs), "targets": empty_targets},
    }
    losses = {  # case: (batch, whether the denoising entries are kept, the original's terms)
        "regular": original_terms(criterion, without_denoising(outputs), targets),
        "denoising": original_terms(criterion, outputs, targets),
        "no_boxes": original_terms(criterion, empty_outputs, empty_targets),
    }
    commit = subprocess.run(["git", "-C", str(orig), "rev-parse", "HEAD"], capture_output=True, text=True)
    fixture = {
        "source": f"original D-FINE {commit.stdout.strip() or '(unknown commit)'}, make_criterion_fixture.py",
        "settings": criterion_settings(criterion),
        "batches": batches,
        "losses": losses,
    }
    torch.save(fixture, args.out)
    size = Path(args.out).stat().st_size
    counts = ", ".join(f"{name}: {len(terms)} terms" for name, terms in losses.items())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB): {counts}")


if __name__ == "__main__":
    main()
