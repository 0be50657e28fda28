"""``dfine-train``: train (or evaluate with --test-only) a D-FINE model from a YAML config.

Examples:
    dfine-train -c configs/quickstart.yml
    dfine-train -c configs/dfine/dfine_hgnetv2_s_coco.yml --use-amp --seed 0
    dfine-train -c CFG -r auto                      # resume from output_dir/last.pth when it exists
    dfine-train -c CFG --exist-ok                   # start over in an output_dir that holds a run
    dfine-train -c CFG -t dfine_s_obj365.pth        # fine-tune from weights (class heads re-initialised)
    torchrun --nproc_per_node=4 -m dfine.cli.train -c CFG
    dfine-train -c CFG --print-config               # show the fully resolved config and exit
    dfine-train -c CFG --check-data                 # check images and annotations, exit 0 when trainable
    dfine-train -c CFG --check-data full            # ... and decode every image
    dfine-train -c CFG --show-batch 2               # draw 2 augmented training batches to output_dir

Exit codes: 0 done, 1 crash, 2 bad input (message says what to fix), 75 stopped by SIGTERM/SIGUSR1 after
saving last.pth (resume with -r auto), 130 Ctrl-C (last.pth saved).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from dfine.cli.common import add_config_arguments, config_from_args, run_cli
from dfine.config import Config, dump_config

__all__ = ["build_parser", "flag_overrides", "main"]


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
        help="continue a run: weights, optimizer, schedules, EMA, epoch and RNG from a checkpoint; "
        "'auto' uses output_dir/last.pth when present and starts fresh otherwise",
    )
    start.add_argument(
        "-t",
        "--tune",
        default=None,
        metavar="PATH",
        help="start a new run from these weights (fine-tuning); other-sized class heads are re-initialised",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible runs")
    parser.add_argument("--use-amp", action="store_true", help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    parser.add_argument("--output-dir", default=None, help="where checkpoints and logs go (sets output_dir)")
    parser.add_argument(
        "--exist-ok",
        action="store_true",
        help="start a fresh run even though output_dir holds checkpoints (they are overwritten); without "
        "it such a run is refused",
    )
    parser.add_argument("--test-only", action="store_true", help="only evaluate (use with -r or -t)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--check-data",
        nargs="?",
        const="header",
        choices=["header", "full"],
        help="check the datasets and exit (0 = trainable); 'full' also decodes every image",
    )
    parser.add_argument(
        "--show-batch", type=int, default=0, metavar="N", help="draw N augmented training batches and exit"
    )
    return parser


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Flags that are shorthands for config keys, as ``key=value`` overrides (they win over -u)."""
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


def check_data(cfg: Config, mode: str = "header") -> int:
    """Print a report for the training and validation datasets; 0 when both can be trained on."""
    from dfine.data import build_dataloader, check_dataset

    ok = True
    for split in ("train", "val"):
        block = cfg.get(f"{split}_dataloader")
        if block is None:
            continue
        loader = build_dataloader(
            block, split=split, num_classes=cfg.get("num_classes"), where=cfg.where(split)
        )
        report = check_dataset(loader.dataset, images="decode" if mode == "full" else "header")
        print(f"[{split}]")
        for line in report.summary_lines():
            print(f"  {line}")
        ok = ok and report.ok
    print("data check passed" if ok else "data check FAILED: fix the errors above before training")
    return 0 if ok else 1


def show_batches(cfg: Config, num_batches: int) -> int:
    from dfine.data import build_dataloader
    from dfine.inference.show_batch import first_mixing_epoch, save_batch_pictures

    loader = build_dataloader(
        cfg["train_dataloader"], split="train", seed=cfg.get("seed") or 0, num_classes=cfg.get("num_classes")
    )
    loader.set_epoch(first_mixing_epoch(loader))  # DEIM's recipe composes images only from its second stage
    out_dir = Path(cfg.get("output_dir") or "./output/run") / "batches"
    for path in save_batch_pictures(loader, num_batches, out_dir):
        print(f"wrote {path}")
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, flag_overrides(args))
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.check_data:
        return check_data(cfg, args.check_data)
    if args.show_batch:
        return show_batches(cfg, args.show_batch)

    from dfine.distributed import cleanup
    from dfine.engine.setup import build_training
    from dfine.engine.signals import StopRequested
    from dfine.engine.trainer import Trainer

    run = build_training(cfg, resume=args.resume, tune=args.tune, exist_ok=args.exist_ok or args.test_only)
    trainer = Trainer(run)
    try:
        metrics = trainer.evaluate() if args.test_only else trainer.fit()
    except StopRequested:
        cleanup()  # a stop is agreed on by every rank after the same step, so all of them are here
        raise
    # Every rank ends together (the last evaluation is collective). Leaving the process group now, while the
    # interpreter is whole, matters: a gloo group left to the exit can abort it (SIGABRT, "terminate called
    # without an active exception"), and torchrun then reports a finished run as failed. Not after other
    # errors: ranks still inside a collective would wait on this one.
    cleanup()
    if run.context.is_main:
        summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print(json.dumps(summary, indent=2))
        if not args.test_only:
            print(next_steps(args.config, run.output_dir, run.state.best_ap, run.state.best_epoch))
    return 0


def next_steps(config: str, output_dir: Path, best_ap: float, best_epoch: int) -> str:
    """Where the results are and the commands that use them, printed when training ends."""
    best = output_dir / "best.pth"
    if best_ap < 0:
        return f"done: no evaluation ran; weights in {output_dir / 'last.pth'}"
    return "\n".join(
        [
            f"best AP {best_ap:.4f} at epoch {best_epoch}: {best}",
            f"curves and pictures: {output_dir}/results.png, pr_curve.png, f1_curve.png, val_predictions.jpg",
            f"TensorBoard: tensorboard --logdir {output_dir}",
            f"evaluate: dfine-eval -c {config} -r {best}",
            f"predict:  dfine-predict -c {config} -r {best} --input IMAGES",
            f"export:   dfine-export -c {config} -r {best} --dynamic-batch",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
