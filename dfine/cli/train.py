"""``dfine-train``: train (or evaluate with --test-only) a D-FINE model from a YAML config.

Examples:
    dfine-train -c configs/quickstart.yml
    dfine-train -c configs/dfine/dfine_hgnetv2_s_coco.yml --use-amp --seed 0
    dfine-train -c CFG -r auto                      # resume from output_dir/last.pth when it exists
    dfine-train -c CFG -t dfine_s_obj365.pth        # fine-tune from weights (class heads re-initialised)
    torchrun --nproc_per_node=4 -m dfine.train -c CFG
    dfine-train -c CFG --print-config               # show the fully resolved config and exit
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..builder import build_model
from ..config import dump_config
from .common import add_config_arguments, config_from_args, run_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfine-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "-r",
        "--resume",
        default=None,
        metavar="PATH|auto",
        help="resume everything (weights, optimizer, schedules, EMA, epoch, RNG) from a checkpoint; "
        "'auto' uses output_dir/last.pth when present",
    )
    start.add_argument(
        "-t",
        "--tune",
        default=None,
        metavar="PATH",
        help="start from these weights only (fine-tuning); mismatched class heads are re-initialised",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible runs")
    parser.add_argument("--use-amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument(
        "--output-dir", default=None, help="where checkpoints and logs go (overrides output_dir)"
    )
    parser.add_argument("--test-only", action="store_true", help="only evaluate the model on the val set")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--check-data", action="store_true", help="check the datasets and exit (0 = trainable)"
    )
    parser.add_argument(
        "--show-batch",
        type=int,
        default=0,
        metavar="N",
        help="write N augmented training batches as pictures and exit",
    )
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags that are shorthands for config keys, as ``key=value`` overrides."""
    overrides = []
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.use_amp:
        overrides.append("use_amp=true")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    return overrides


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, flag_overrides(args))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    model = build_model(cfg)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"built {type(model).__name__} with {num_parameters:,} parameters from {args.config}")
    print(
        "training is not available yet in this version: use --print-config to inspect the config",
        file=sys.stderr,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
