"""Parameters and GFLOPs of D-FINE models, as one markdown table.

Parameters are counted on the trainable model (equal to the original D-FINE's counts), GFLOPs with
``torch.utils.flop_counter`` on the ``deploy()`` form at batch 1, 1 multiply-add = 2 FLOPs, convolutions and
matrix products only, like the paper's table (see dfine/model_info.py for what is and is not counted).
All five COCO sizes take about 20 s on one CPU thread. Examples::

    python tools/model_info.py                                     # N, S, M, L, X at 640x640
    python tools/model_info.py --config configs/dfine/dfine_hgnetv2_s_coco.yml --image-size 320
    python tools/model_info.py --sizes n s --extra-ops             # also count grid_sample and mv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import dfine
from dfine.deploy.model_info import count_gflops, count_parameters

ROOT = Path(__file__).resolve().parents[1]
SIZES = ("n", "s", "m", "l", "x")
# D-FINE paper, Table 1 (COCO, 640x640): parameters in millions, GFLOPs
PAPER = {"n": (4, 7), "s": (10, 25), "m": (19, 57), "l": (31, 91), "x": (62, 202)}


def size_config(size: str) -> Path:
    return ROOT / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml"


def measure(config: Path, image_size: tuple[int, int], extra_ops: bool = False) -> tuple[int, float]:
    """(parameters, GFLOPs) of the model a config builds, GFLOPs of its deploy() form at ``image_size``."""
    cfg = dfine.load_config(config, [f"eval_spatial_size=[{image_size[0]}, {image_size[1]}]"])
    model = dfine.build_model(cfg)
    parameters = count_parameters(model)
    return parameters, count_gflops(model.deploy(), image_size, extra_ops=extra_ops)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="one config instead of the five COCO sizes")
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES), help="COCO sizes to list")
    parser.add_argument("--image-size", type=int, nargs="+", default=[640], help="H [W] in pixels")
    parser.add_argument("--extra-ops", action="store_true", help="also count grid_sample and mv")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    image_size = (args.image_size[0], args.image_size[-1])
    if args.config:
        rows = [(args.config.stem, args.config, None)]
    else:
        rows = [(f"D-FINE-{size.upper()}", size_config(size), size) for size in args.sizes]
    show_paper = image_size == (640, 640) and not args.config
    counted = "conv + matmul + grid_sample + mv" if args.extra_ops else "conv + matmul"
    header = [
        "model",
        "parameters",
        f"GFLOPs ({image_size[0]}x{image_size[1]}, batch 1, deploy(), 1 MAC = 2 FLOPs, {counted})",
    ]
    if show_paper:
        header.append("paper (params M / GFLOPs)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|")
    for name, config, size in rows:
        parameters, gflops = measure(config, image_size, args.extra_ops)
        cells = [name, f"{parameters:,} ({parameters / 1e6:.1f} M)", f"{gflops:.1f}"]
        if show_paper and size is not None:
            cells.append("{} M / {}".format(*PAPER[size]))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
