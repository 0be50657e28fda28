"""Argument parsing shared by the command-line tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..config import Config, load_config
from ..engine.distributed import setup_logging
from ..registry import ConfigError

__all__ = ["add_config_arguments", "config_from_args", "run_cli"]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``-c CONFIG``, ``-u key=value ...`` and ``-d DEVICE``, as in the original train.py."""
    parser.add_argument("-c", "--config", required=True, help="experiment YAML, e.g. configs/quickstart.yml")
    parser.add_argument(
        "-u",
        "--update",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config values (parsed as YAML), e.g. -u epochs=12 train_dataloader.total_batch_size=8",
    )
    parser.add_argument(
        "-d", "--device", default=None, help="cpu, cuda or cuda:1 (default: cuda if available)"
    )


def config_from_args(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> Config:
    """Load ``args.config`` with ``-u`` overrides, then the flag-derived overrides (flags win)."""
    return load_config(args.config, [*args.update, *extra_overrides])


def run_cli(main_body, argv: Sequence[str] | None) -> int:  # type: ignore[no-untyped-def]
    """Run ``main_body(argv)``; config mistakes exit with code 2 and one readable message, not a traceback."""
    setup_logging(None)  # console on rank 0; the trainer adds output_dir/train.log
    try:
        return int(main_body(argv) or 0)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
