"""Convert D-FINE weights between a ``.pth`` (ours / the original's) and a HuggingFace model folder.

The direction follows the input: a ``.pth`` file becomes an HF ``DFineForObjectDetection`` folder
(``model.safetensors`` + ``config.json`` with the class names in ``id2label`` +
``preprocessor_config.json``, an ``RTDetrImageProcessor`` doing our validation preprocessing), an HF folder
becomes a ``.pth`` holding ``{"model": state_dict, "label_map": [...]}``. Class names come from the
checkpoint's label map, else COCO's for a COCO config, else the config's validation dataset.
Afterwards both models run on the same random image and the largest output difference is printed; the exit
status is 1 above ``--tolerance``.

Examples::

    # original / our checkpoint (plain state dict, {"model": sd} or {"ema": {"module": sd}}) -> HF folder
    python tools/convert_weights.py -c configs/dfine/dfine_hgnetv2_s_coco.yml -i dfine_s_coco.pth -o hf/s
    # HF folder -> our checkpoint
    python tools/convert_weights.py -c configs/dfine/dfine_hgnetv2_s_coco.yml -i hf/s -o dfine_s.pth
    # a model trained with 20 classes, checked at 512x512 (-u takes the rest of the line)
    python tools/convert_weights.py -c my.yml -i best.pth -o hf/mine --image-size 512 -u num_classes=20

Loading the result in transformers (the snippet of HF's D-FINE page)::

    from transformers import DFineForObjectDetection, RTDetrImageProcessor
    processor = RTDetrImageProcessor.from_pretrained("hf/s")
    model = DFineForObjectDetection.from_pretrained("hf/s")

A config that letterboxes (``Resize keep_ratio: true``) gets no ``preprocessor_config.json``: HF's processor
cannot express it (the tool says so); every other file is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import dfine
from dfine.checkpoint import extract_model_state, load_checkpoint
from dfine.hf.config import import_transformers
from dfine.hf.conversion import load_hf_pretrained, save_hf_pretrained
from dfine.hf.folder import compare_outputs, label_entries, label_settings, processor_settings
from dfine.inference.predictor import resolve_class_table


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


def write_processor(cfg: dict, folder: Path) -> bool:
    """Write preprocessor_config.json, or say why HF's processor cannot do our preprocessing."""
    try:
        settings = processor_settings(cfg)
    except ValueError as error:
        print(f"no preprocessor_config.json written: {error}")
        return False
    import_transformers().RTDetrImageProcessor(**settings).save_pretrained(str(folder))
    size = settings["size"]
    print(f"wrote {folder / 'preprocessor_config.json'} (resize to {size['height']}x{size['width']}, 0..1)")
    return True


def check(model: nn.Module, hf_folder: Path, image_size: tuple[int, int], tolerance: float) -> bool:
    transformers = import_transformers()
    hf_model = transformers.DFineForObjectDetection.from_pretrained(str(hf_folder), local_files_only=True)
    model.eval()
    hf_model.eval()
    images = torch.rand(1, 3, *image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, boxes, moved = compare_outputs(model(images), hf_model(pixel_values=images), tolerance)
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
        state, hf_config = load_hf_pretrained(args.input, cfg)
        model.load_state_dict(state, strict=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        entries = label_entries(hf_config)
        torch.save({"model": state, **({"label_map": entries} if entries else {})}, args.output)
        hf_folder = args.input
        print(f"wrote {args.output} ({len(state)} tensors, our layout) from {args.input}")
    else:
        checkpoint = load_checkpoint(args.input)
        state, found = extract_model_state(checkpoint, prefer_ema=args.weights == "ema")
        model.load_state_dict(state, strict=True)
        classes = resolve_class_table(cfg, checkpoint)
        save_hf_pretrained(state, cfg, args.output, label_settings(classes.names, classes.category_ids))
        hf_folder = args.output
        print(f"wrote {args.output} (HF layout) from the {found} weights of {args.input}")
        shown = ", ".join(classes.names[:8]) + (", ..." if len(classes) > 8 else "")
        print(f"class names from {classes.source}: {shown}")
        write_processor(cfg, args.output)
    if args.no_check:
        return 0
    size = args.image_size or cfg.get("eval_spatial_size") or [640, 640]
    image_size = (int(size[0]), int(size[-1]))
    return 0 if check(model, hf_folder, image_size, args.tolerance) else 1


if __name__ == "__main__":
    sys.exit(main())
