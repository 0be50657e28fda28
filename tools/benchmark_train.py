"""Training-step throughput with the per-phase split: ours, and the original D-FINE in the same run.

Ours runs with the speed settings the trainer applies (``dfine.engine.acceleration``: channels-last on a CPU;
``-u compile=true`` adds torch.compile, whose first steps compile). Each step is what the trainer does:
forward (under autocast when --bf16), criterion (fp32), backward, then gradient clipping + AdamW + EMA. The
variants are timed in interleaved rounds (one step of each per round). Batches are synthetic (random images,
2-8 random boxes per image) so the figures show the engine and model, not the disk;
``tools/benchmark_data.py`` measures the loader.

Usage::

    python tools/benchmark_train.py --sizes n s --image-sizes 640 320 --batch-size 8
    python tools/benchmark_train.py --sizes n --image-sizes 640 --batch-size 4 --bf16
    DFINE_ORIG_DIR=../D-FINE python tools/benchmark_train.py --sizes n --batch-size 4 --original
    python tools/benchmark_train.py --sizes n --batch-size 4 -u channels_last=false   # the NCHW step
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dfine
from dfine.engine.acceleration import apply_speed_settings, compile_hot_modules
from dfine.engine.ema import ModelEMA
from dfine.engine.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("forward", "loss", "backward", "optimizer+ema")
WARMUP_STEPS = 2


def make_batch(batch_size: int, size: int, num_classes: int, seed: int) -> tuple[torch.Tensor, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, size, size, generator=gen)
    targets = []
    for _ in range(batch_size):
        n = int(torch.randint(2, 9, (), generator=gen))
        centre = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
        wh = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        targets.append({"labels": labels, "boxes": torch.cat([centre, wh], 1)})
    return images, targets


@dataclass
class Runner:
    """One variant being timed: what a trainer step touches, and its per-phase samples."""

    name: str
    model: torch.nn.Module
    criterion: Callable[..., dict[str, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    ema: ModelEMA
    bf16: bool = False
    samples: dict[str, list[float]] = field(default_factory=lambda: {phase: [] for phase in PHASES})

    def step(self, images: torch.Tensor, targets: list[dict], record: bool) -> None:
        self.model.train()
        marks = [time.perf_counter()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.model(images, targets)
        marks.append(time.perf_counter())
        losses = self.criterion(outputs, targets)
        loss = sum(losses.values())
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 0.1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        marks.append(time.perf_counter())
        if record:
            for phase, start, end in zip(PHASES, marks, marks[1:], strict=False):
                self.samples[phase].append(end - start)

    def medians(self) -> dict[str, float]:
        return {phase: statistics.median(values) for phase, values in self.samples.items()}


def time_interleaved(runners: list[Runner], batch: tuple[torch.Tensor, list[dict]], steps: int) -> None:
    """``WARMUP_STEPS`` untimed steps (oneDNN and the allocator are slow at first), then ``steps`` rounds of
    one step per runner, so that load from elsewhere on a shared machine falls on all runners alike."""
    images, targets = batch
    for round_index in range(WARMUP_STEPS + steps):
        for runner in runners:
            runner.step(images, targets, record=round_index >= WARMUP_STEPS)


def ours(
    size: str, image_size: int, overrides: list[str]
) -> tuple[torch.nn.Module, Any, dict[str, Any], str]:
    """Our model and criterion with the speed settings the trainer applies on this CPU (and ``overrides``)."""
    cfg = dfine.load_config(
        ROOT / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml",
        [f"eval_spatial_size=[{image_size}, {image_size}]", *overrides],
    )
    model = dfine.build_model(cfg)
    settings = apply_speed_settings(model, cfg, torch.device("cpu"))
    return model, dfine.build_criterion(cfg), cfg, ", ".join(settings) or "NCHW"


def original(size: str, image_size: int) -> tuple[torch.nn.Module, Any]:
    orig_dir = Path(os.environ.get("DFINE_ORIG_DIR", ROOT.parent / "orig")).resolve()
    sys.path.insert(0, str(orig_dir))
    from src.core import YAMLConfig

    cfg = YAMLConfig(
        str(orig_dir / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml"),
        HGNetv2={"pretrained": False},
        eval_spatial_size=[image_size, image_size],
    )
    return cfg.model, cfg.criterion


def report(name: str, phases: dict[str, float], batch_size: int, reference: float | None) -> float:
    total = sum(phases.values())
    split = "  ".join(f"{phase} {1000 * seconds:7.0f}ms" for phase, seconds in phases.items())
    ratio = f"  x{total / reference:.2f} of original" if reference else ""
    print(f"{name:52s} {batch_size / total:7.2f} img/s  step {1000 * total:7.0f}ms  {split}{ratio}")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["n"], choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--image-sizes", nargs="+", type=int, default=[640])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    parser.add_argument("--original", action="store_true", help="time the original D-FINE first (one size)")
    parser.add_argument("--nchw", action="store_true", help="also time ours with channels_last=false")
    parser.add_argument(
        "-u", "--update", nargs="*", default=[], help="config overrides for ours, e.g. channels_last=false"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"batch {args.batch_size}, {args.threads} threads, median of {args.steps} interleaved steps, "
        "synthetic batches"
    )
    for size in args.sizes:
        for image_size in args.image_sizes:
            batch = make_batch(args.batch_size, image_size, 80, seed=0)
            runners = []
            if args.original:
                torch.manual_seed(0)
                model, criterion = original(size, image_size)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                runners.append(
                    Runner(
                        f"original {size.upper()} {image_size}px fp32",
                        model,
                        criterion,
                        optimizer,
                        ModelEMA(model),
                    )
                )
            variants = [(False, args.update)] + ([(True, args.update)] if args.bf16 else [])
            if args.nchw:
                variants.append((False, [*args.update, "channels_last=false"]))
            for bf16, overrides in variants:
                torch.manual_seed(0)
                model, criterion, cfg, settings = ours(size, image_size, overrides)
                optimizer = build_optimizer(model, cfg["optimizer"])
                ema = ModelEMA(model)
                if cfg.get("compile"):
                    compile_hot_modules(model)
                name = f"dfine {size.upper()} {image_size}px {'bf16' if bf16 else 'fp32'} ({settings})"
                runners.append(Runner(name, model, criterion, optimizer, ema, bf16))
            time_interleaved(runners, batch, args.steps)
            reference = (
                report(runners[0].name, runners[0].medians(), args.batch_size, None)
                if args.original
                else None
            )
            for runner in runners[1 if args.original else 0 :]:
                report(runner.name, runner.medians(), args.batch_size, reference)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
