"""``dfine-eval``: evaluate a checkpoint on the config's validation set (COCO metrics).

Examples:
    dfine-eval -c configs/quickstart.yml -r output/quickstart/best.pth
    dfine-eval -c CFG -r CKPT --json metrics.json --save-predictions predictions.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..builder import build_model
from .common import add_config_arguments, config_from_args, run_cli

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfine-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    parser.add_argument(
        "-r", "--resume", required=False, default=None, metavar="CKPT", help="checkpoint to evaluate"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write AP, AP50, ... to this JSON file")
    parser.add_argument(
        "--save-predictions", default=None, metavar="FILE", help="COCO results JSON of detections"
    )
    return parser


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    model = build_model(cfg)
    print(f"built {type(model).__name__} from {args.config}")
    print("evaluation is not available yet in this version", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
