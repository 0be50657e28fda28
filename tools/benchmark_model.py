"""Eval latency of our D-FINE next to the HuggingFace port (and the original code, when checked out), one run.

Every model gets the same weights and the same input; the table shows median latency and the ratio to the
reference (the HF port, a fair stand-in for the original's eval path). Example::

    python tools/benchmark_model.py --size n --image-size 640 --threads 2
    DFINE_ORIG_DIR=../D-FINE python tools/benchmark_model.py --size n --original
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

import dfine
from dfine.testing import random_images, realistic_state_dict

ROOT = Path(__file__).resolve().parents[1]


def median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _compare(a: dict, b: dict) -> str:
    """How far two outputs differ, robust to swapped near-tied queries.

    Two encoder scores closer than fp32 rounding can swap two queries between numerically equal paths (or
    across the top-k boundary); that moves whole rows, so report the sorted score gap and the moved rows.
    """
    score_a = a["pred_logits"].sigmoid().amax(-1)
    score_b = b["pred_logits"].sigmoid().amax(-1)
    sorted_gap = (score_a.sort(-1).values - score_b.sort(-1).values).abs().max().item()
    rows = (a["pred_boxes"] - b["pred_boxes"]).abs().amax(-1) > 1e-4
    return f"sorted scores within {sorted_gap:.1e}; {int(rows.sum())} of {rows.numel()} query rows moved"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="n", choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--original", action="store_true", help="also time the original D-FINE (DFINE_ORIG_DIR)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.image_size
    cfg = dfine.load_config(
        ROOT / f"configs/dfine/dfine_hgnetv2_{args.size}_coco.yml", [f"eval_spatial_size=[{size}, {size}]"]
    )
    model = dfine.build_model(cfg)
    weights = realistic_state_dict(model, seed=0)
    model.load_state_dict(weights)
    images = random_images(args.batch_size, size, size)
    rows: list[tuple[str, float]] = []

    with torch.inference_mode():
        eager = model.eval()
        reference_out = eager(images)
        rows.append(("dfine eval (no deploy)", median_ms(lambda: eager(images), args.warmup, args.repeats)))
        deployed = dfine.build_model(cfg)
        deployed.load_state_dict(weights)
        deployed.deploy()
        diff = _compare(deployed(images), reference_out)
        rows.append(("dfine deploy()", median_ms(lambda: deployed(images), args.warmup, args.repeats)))

        try:
            from transformers import DFineForObjectDetection

            from dfine.hf_conversion import dfine_to_hf_state_dict, hf_config_from_dfine_config

            hf = DFineForObjectDetection(hf_config_from_dfine_config(cfg)).eval()
            hf.load_state_dict(dfine_to_hf_state_dict(weights, cfg), strict=False)
            rows.append(
                (
                    "HF DFineForObjectDetection",
                    median_ms(lambda: hf(pixel_values=images), args.warmup, args.repeats),
                )
            )
        except ImportError as error:
            print(f"skipping the HF port: {error}")

        if args.original:
            orig_dir = Path(os.environ.get("DFINE_ORIG_DIR", ROOT.parent / "orig")).resolve()
            sys.path.insert(0, str(orig_dir))
            from src.core import YAMLConfig

            original = YAMLConfig(
                str(orig_dir / f"configs/dfine/dfine_hgnetv2_{args.size}_coco.yml"),
                HGNetv2={"pretrained": False},
                eval_spatial_size=[size, size],
            ).model
            original.load_state_dict(weights)
            original.eval()
            rows.append(("original eval", median_ms(lambda: original(images), args.warmup, args.repeats)))
            original.deploy()
            rows.append(("original deploy()", median_ms(lambda: original(images), args.warmup, args.repeats)))

    reference = next((ms for name, ms in rows if name.startswith("HF")), rows[0][1])
    print(
        f"\nD-FINE-{args.size.upper()} eval latency, {size}x{size}, batch {args.batch_size}, fp32, "
        f"{args.threads} threads ({args.repeats} runs, median)"
    )
    print(f"{'model':32s} {'ms':>9s} {'x reference':>12s}")
    for name, ms in rows:
        print(f"{name:32s} {ms:9.1f} {ms / reference:12.2f}")
    print(f"deploy() vs eval: {diff}")


if __name__ == "__main__":
    main()
