"""``dfine-eval``: COCO metrics of a checkpoint on the config's validation set, or of a results file.

Examples:
    dfine-eval -c configs/quickstart.yml -r output/quickstart/best.pth
    dfine-eval -c CFG -r CKPT --json metrics.json --save-predictions predictions.json
    dfine-eval -c CFG --predictions other_detector.json       # score another detector's COCO results file
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dfine.cli.common import add_config_arguments, config_from_args, run_cli

__all__ = ["build_parser", "main"]

logger = logging.getLogger(__name__)

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dfine-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-r", "--resume", default=None, metavar="CKPT", help="checkpoint to evaluate")
    source.add_argument(
        "--predictions", default=None, metavar="FILE", help="score a COCO results JSON instead"
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write AP, AP50, ... to this JSON file")
    parser.add_argument(
        "--save-predictions", default=None, metavar="FILE", help="COCO results JSON of detections"
    )
    return parser


def _write_json(path: str, data: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args, [f"device={args.device}"] if args.device else [])

    import torch

    from dfine.checkpoint import extract_model_state, load_checkpoint, load_weights_strict
    from dfine.config.build import build_model, build_postprocessor
    from dfine.data import build_dataloader
    from dfine.engine.acceleration import choose_channels_last
    from dfine.evaluation.coco_evaluator import build_evaluator, score_results_file
    from dfine.evaluation.loop import evaluate

    loader = build_dataloader(
        cfg["val_dataloader"],
        split="val",
        num_classes=cfg.get("num_classes"),
        where=cfg.where("val_dataloader"),
    )
    if args.predictions:
        evaluator = score_results_file(args.predictions, loader.dataset.to_coco_dict())
        metrics: dict[str, Any] = dict(evaluator.metrics)
    else:
        device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        checkpoint = load_checkpoint(args.resume, cfg=cfg)
        weights, source = extract_model_state(checkpoint)
        model = build_model(cfg)
        load_weights_strict(model, weights)
        model.to(device)
        if choose_channels_last(cfg, device):  # the layout training evaluates in, so the APs agree
            model.use_channels_last()
        logger.info("evaluating %s weights of %s", source, args.resume)
        label_map = checkpoint.get("label_map") if isinstance(checkpoint, dict) else None
        category_ids = [int(entry["category_id"]) for entry in label_map] if label_map else None
        evaluator = build_evaluator(
            cfg.get("evaluator"), loader.dataset.to_coco_dict(), cfg.where("evaluator")
        )
        metrics = evaluate(
            model, build_postprocessor(cfg).to(device), loader, device, evaluator, category_ids=category_ids
        )
        print(evaluator.per_class_table())
    summary = {key: metrics[key] for key in METRIC_KEYS if key in metrics}
    print(json.dumps(summary, indent=2))
    if args.json:
        _write_json(args.json, summary)
    if args.save_predictions:
        _write_json(args.save_predictions, evaluator.to_coco_results())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
