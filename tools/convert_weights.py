"""Convert D-FINE weights between a ``.pth`` (ours / the original's) and a HuggingFace model folder.

The direction follows the input: a ``.pth`` file becomes an HF ``DFineForObjectDetection`` folder
(``model.safetensors`` + ``config.json``), an HF folder becomes a ``.pth`` holding ``{"model": state_dict}``.
Afterwards both models run on the same random image and the largest output difference is printed; the exit
status is 1 above ``--tolerance``.

Examples::

    # original / our checkpoint (plain state dict, {"model": sd} or {"ema": {"module": sd}}) -> HF folder
    python tools/convert_weights.py -c configs/dfine/dfine_hgnetv2_s_coco.yml -i dfine_s_coco.pth -o hf/s
    # HF folder -> our checkpoint
    python tools/convert_weights.py -c configs/dfine/dfine_hgnetv2_s_coco.yml -i hf/s -o dfine_s.pth
    # a model trained with 20 classes, checked at 512x512 (-u takes the rest of the line)
    python tools/convert_weights.py -c my.yml -i best.pth -o hf/mine --image-size 512 -u num_classes=20

Loading the result in transformers::

    from transformers import DFineForObjectDetection
    model = DFineForObjectDetection.from_pretrained("hf/s")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

import dfine
from dfine.checkpoint import extract_model_state, load_checkpoint
from dfine.hf.config import import_transformers
from dfine.hf.conversion import load_hf_pretrained, save_hf_pretrained


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--config", required=True, type=Path, help="our YAML config of the model")
    parser.add_argument(
        "-i", "--input", required=True, type=Path, help="a .pth checkpoint, or an HF folder (made a .pth)"
    )
    parser.add_argument("-o", "--output", required=True, type=Path, help="the HF folder, or .pth, to write")
    parser.add_argument(
        "-u",
        "--update",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. num_classes=20",
    )
    parser.add_argument(
        "--weights", choices=("ema", "model"), default="ema", help="which weights of a .pth holding both"
    )
    parser.add_argument(
        "--image-size", type=int, nargs="+", help="H [W] of the check image (default: eval size)"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted output difference")
    parser.add_argument("--no-check", action="store_true", help="convert without running both models")
    return parser.parse_args(argv)


def compare(ours: dict[str, Tensor], theirs: object, tolerance: float) -> tuple[float, float, int]:
    """Max |logits| and |boxes| differences, letting queries that swapped rank be compared with each other.

    Near-tied encoder scores may come out of the top-k in another order in the two implementations; a row
    that differs in place is compared with its nearest row of the other model instead, and counted.
    """
    ours_rows = torch.cat((ours["pred_logits"], ours["pred_boxes"]), dim=-1)  # [B, Q, C + 4]
    hf_rows = torch.cat((theirs.logits, theirs.pred_boxes), dim=-1)
    difference = (ours_rows - hf_rows).abs()  # [B, Q, C + 4]
    moved = 0
    for image, query in (difference.amax(-1) > tolerance).nonzero().tolist():
        nearest = (hf_rows[image] - ours_rows[image, query]).abs().amax(-1).argmin()
        difference[image, query] = (hf_rows[image, nearest] - ours_rows[image, query]).abs()
        moved += 1
    classes = ours["pred_logits"].shape[-1]
    return difference[..., :classes].max().item(), difference[..., classes:].max().item(), moved


def check(model: nn.Module, hf_folder: Path, image_size: tuple[int, int], tolerance: float) -> bool:
    transformers = import_transformers()
    hf_model = transformers.DFineForObjectDetection.from_pretrained(str(hf_folder), local_files_only=True)
    model.eval()
    hf_model.eval()
    images = torch.rand(1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, boxes, moved = compare(model(images), hf_model(pixel_values=images), tolerance)
    print(
        f"check on a random {image_size[0]}x{image_size[1]} image: max |logits| difference {logits:.2e}, "
        f"max |boxes| difference {boxes:.2e} (tolerance {tolerance:g}; {moved} queries in another order)"
    )
    return max(logits, boxes) <= tolerance


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = dfine.load_config(args.config, args.update)
    model = dfine.build_model(cfg)
    if args.input.is_dir():
        state, _ = load_hf_pretrained(args.input, cfg)
        model.load_state_dict(state, strict=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state}, args.output)
        hf_folder = args.input
        print(f"wrote {args.output} ({len(state)} tensors, our layout) from {args.input}")
    else:
        state, found = extract_model_state(load_checkpoint(args.input), prefer_ema=args.weights == "ema")
        model.load_state_dict(state, strict=True)
        save_hf_pretrained(state, cfg, args.output)
        hf_folder = args.output
        print(f"wrote {args.output} (HF layout) from the {found} weights of {args.input}")
    if args.no_check:
        return 0
    size = args.image_size or cfg.get("eval_spatial_size") or [640, 640]
    image_size = (int(size[0]), int(size[-1]))
    return 0 if check(model, hf_folder, image_size, args.tolerance) else 1


if __name__ == "__main__":
    sys.exit(main())
