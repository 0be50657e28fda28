"""Record the original D-FINE model's outputs so CI can re-check our model's parity without the original code.

The weights are not stored: :func:`dfine.models.realistic_weights.realistic_state_dict` regenerates them
from a seed and the
key names, which both code bases share. The fixture stores the original's key list and shapes, the seed, a
checksum of the weights, and the original's eval and training outputs on a seeded 320x320 image.

Usage (with the original repository checked out, e.g. ``git clone https://github.com/Peterande/D-FINE``)::

    DFINE_ORIG_DIR=../D-FINE python tools/make_model_fixture.py --size n
    # writes tests/fixtures/model_parity_n.pt (~0.3 MB); tests/models/test_model_parity.py reads it
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from dfine.models.realistic_weights import random_images, realistic_state_dict, state_dict_checksum

SEED = 7
IMAGE_SIZE = (320, 320)


def build_original(orig_dir: Path, size: str, num_denoising: int) -> torch.nn.Module:
    sys.path.insert(0, str(orig_dir))
    from src.core import YAMLConfig  # the original's config system

    cfg = YAMLConfig(
        str(orig_dir / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml"),
        HGNetv2={"pretrained": False},
        DFINETransformer={"num_denoising": num_denoising},
        eval_spatial_size=list(IMAGE_SIZE),
    )
    return cfg.model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="n", choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--orig", default=os.environ.get("DFINE_ORIG_DIR", "../orig"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    orig_dir = Path(args.orig).resolve()
    if not (orig_dir / "src" / "zoo" / "dfine").is_dir():
        sys.exit(f"no original D-FINE checkout at {orig_dir}: pass --orig or set DFINE_ORIG_DIR")

    model = build_original(orig_dir, args.size, num_denoising=0)
    weights = realistic_state_dict(model, SEED)
    model.load_state_dict(weights, strict=True)
    images = random_images(1, *IMAGE_SIZE, seed=SEED)
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        eval_out = model(images)
        model.train()
        train_out = model(
            images, [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
        )
    state = model.state_dict()
    fixture = {
        "size": args.size,
        "seed": SEED,
        "image_size": list(IMAGE_SIZE),
        "keys": list(state),
        "shapes": [list(v.shape) for v in state.values()],
        "checksum": state_dict_checksum(weights),
        "eval": {k: eval_out[k].detach().clone() for k in ("pred_logits", "pred_boxes")},
        "train": {
            k: train_out[k].detach().clone()
            for k in ("pred_logits", "pred_boxes", "pred_corners", "ref_points")
        },
    }
    out = Path(
        args.out or Path(__file__).resolve().parents[1] / f"tests/fixtures/model_parity_{args.size}.pt"
    )
    torch.save(fixture, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
