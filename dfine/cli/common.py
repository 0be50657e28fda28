"""Argument parsing shared by the command-line tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dfine.checkpoint import CheckpointError
from dfine.config import Config, load_config
from dfine.config.registry import ConfigError
from dfine.data.image_io import UnreadableImageError
from dfine.distributed import setup_logging
from dfine.engine.signals import EXIT_PREEMPTED, StopRequested

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


# Mistakes in what the user gave (config, paths, checkpoint, images): a message, not a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    FileNotFoundError,
    CheckpointError,
    UnreadableImageError,
)


def run_cli(  # type: ignore[no-untyped-def]
    main_body, argv: Sequence[str] | None, user_errors: tuple[type[Exception], ...] = ()
) -> int:
    """Run ``main_body(argv)``; :data:`USER_ERRORS` and the tool's own ``user_errors`` exit with code 2 and
    one readable message, not a traceback."""
    setup_logging(None)  # console on rank 0; the trainer adds output_dir/train.log
    try:
        return int(main_body(argv) or 0)
    except (*USER_ERRORS, *user_errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StopRequested as stop:  # SIGTERM/SIGUSR1: last.pth is saved; a requeue resumes with -r auto
        print(f"preempted: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        # the trainer has already saved last.pth and said how to continue
        print("interrupted", file=sys.stderr)
        return 130  # the shell's code for a SIGINT exit
