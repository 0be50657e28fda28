"""GPU acceptance run: the training and eval paths on one CUDA device, in one command and one table.

For D-FINE N and S at 640x640 it measures, on synthetic batches:

- training img/s through the trainer's own step (``dfine.engine.step.TrainStep``: autocast, GradScaler,
  clipping, AdamW, EMA) in fp32, bf16 autocast and fp16 autocast + GradScaler, each plain (NCHW), with
  channels-last, and with ``compile: true``; peak GPU memory of each;
- the first loss of each variant on the same batch from the same weights: finite, and within
  ``--loss-tolerance`` (relative) of fp32;
- eval latency at batch 1 and throughput at batch 32 of the deployed model, fp32 and fp16 autocast;
- an ONNX export checked in onnxruntime-gpu when it is installed (boxes and scores within 1e-3);
- with ``DFINE_ORIG_DIR``: the original D-FINE's fp32 train img/s and eval latency, and our ratios to them.

A time budget (``--budget-s``, default 420 s) keeps it within 8 minutes: variants that would start after it
are listed as skipped; torch.compile rows run last. Exit code 1 when a loss is not finite or out of
tolerance, or the ONNX check fails.

``--dry-run`` runs every path on the CPU with the quickstart's D-FINE-N at 96x96 and a few steps (the test
suite does, so this script cannot rot without a failing test); torch.compile is skipped there (minutes on a
CPU) unless ``--dry-run-compile``.

Usage::

    python tools/gpu_check.py                                  # one CUDA device, ~6-8 minutes
    DFINE_ORIG_DIR=../D-FINE python tools/gpu_check.py --json gpu_check.json
    python tools/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import dfine
from dfine.engine.acceleration import apply_speed_settings, compile_hot_modules
from dfine.engine.ema import ModelEMA
from dfine.engine.optim import build_optimizer
from dfine.engine.precision import build_grad_scaler
from dfine.engine.run_state import RunState
from dfine.engine.schedules import LRSchedule
from dfine.engine.step import TrainStep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_train import Runner, make_batch, original  # a sibling script

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LAYOUTS = ("nchw", "channels-last", "compile")


@dataclass
class Row:
    """One line of the table."""

    section: str
    name: str
    values: dict[str, Any] = field(default_factory=dict)
    problem: str = ""


@dataclass
class Plan:
    device: torch.device
    sizes: list[str]
    image_size: int
    batch_size: int
    steps: int
    warmup: int
    repeats: int
    throughput_batch: int
    budget_s: float
    loss_tolerance: float
    compile: bool
    overrides: tuple[str, ...] = ()
    started: float = field(default_factory=time.perf_counter)

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config_for(size: str, plan: Plan, *overrides: str) -> dfine.Config:
    path = ROOT / (
        "configs/quickstart.yml" if size == "quickstart" else f"configs/dfine/dfine_hgnetv2_{size}_coco.yml"
    )
    size_override = f"eval_spatial_size=[{plan.image_size}, {plan.image_size}]"
    return dfine.load_config(path, [size_override, *plan.overrides, *overrides])


def _on(batch: tuple[torch.Tensor, list[dict]], device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    images, targets = batch
    return images.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets]


def train_variant(size: str, precision: str, layout: str, plan: Plan, batch: tuple) -> Row:
    """Img/s, peak memory and the first loss of one (precision, layout) through the trainer's step."""
    name = f"{size.upper()} train {precision} {layout}"
    dtype = PRECISIONS[precision]
    overrides = [f"channels_last={layout != 'nchw'}", "use_amp=false"]
    torch.manual_seed(0)
    cfg = config_for(size, plan, *overrides)
    model = dfine.build_model(cfg).to(plan.device)
    apply_speed_settings(model, cfg, plan.device)
    criterion = dfine.build_criterion(cfg).to(plan.device)
    optimizer = build_optimizer(model, cfg["optimizer"])
    ema = ModelEMA(model, warmups=10)
    if layout == "compile":
        compile_hot_modules(model)
    use_amp = dtype is not None
    amp_dtype = dtype or torch.float32
    images, targets = _on(batch, plan.device)
    # The first loss, before any update, from the same weights and denoising noise for every variant.
    model.train()
    torch.manual_seed(1)
    with torch.autocast(plan.device.type, dtype=amp_dtype, enabled=use_amp):
        started = time.perf_counter()
        outputs = model(images, targets)
        compile_s = time.perf_counter() - started if layout == "compile" else 0.0
    first_loss = float(sum(criterion(outputs, targets).values()).detach())
    del outputs
    total_steps = plan.warmup + plan.steps
    step = TrainStep(
        model, criterion, optimizer, LRSchedule(optimizer, steps_per_epoch=total_steps, epochs=1), ema,
        RunState(seed=0), plan.device, use_amp=use_amp, amp_dtype=amp_dtype,
        scaler=build_grad_scaler(None, plan.device, use_amp, amp_dtype), clip_max_norm=0.1,
    )  # fmt: skip
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    for index in range(plan.warmup):
        step(images, targets, index)
    synchronize(plan.device)
    started = time.perf_counter()
    skipped = sum(step(images, targets, plan.warmup + index) is None for index in range(plan.steps))
    synchronize(plan.device)
    seconds = time.perf_counter() - started
    values = {"img/s": plan.batch_size * plan.steps / seconds, "first loss": first_loss}
    if plan.device.type == "cuda":
        values["peak MB"] = torch.cuda.max_memory_allocated(plan.device) / 2**20
    if compile_s:
        values["compile s"] = compile_s
    problem = ""
    if not math.isfinite(first_loss) or skipped:
        problem = f"non-finite loss ({skipped} of {plan.steps} timed steps skipped)"
    return Row("train", name, values, problem)


def check_losses(rows: list[Row], tolerance: float) -> None:
    """Mark rows whose first loss is more than ``tolerance`` (relative) from the fp32 row of its layout."""
    reference = {row.name.replace(" fp32 ", " "): row for row in rows if " fp32 " in row.name}
    for row in rows:
        base = reference.get(row.name.replace(" bf16 ", " ").replace(" fp16 ", " "))
        if base is None or base is row or "first loss" not in row.values or "first loss" not in base.values:
            continue
        gap = abs(row.values["first loss"] - base.values["first loss"]) / abs(base.values["first loss"])
        row.values["vs fp32"] = gap
        if gap > tolerance and not row.problem:
            row.problem = f"first loss {gap:.1%} from fp32 (tolerance {tolerance:.0%})"


def _median_seconds(run: Any, images: torch.Tensor, plan: Plan) -> float:
    times = []
    for index in range(plan.repeats + 2):
        synchronize(plan.device)
        started = time.perf_counter()
        run(images)
        synchronize(plan.device)
        if index >= 2:  # the first calls pay for kernel selection and allocation
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def eval_rows(size: str, plan: Plan) -> list[Row]:
    """Latency (batch 1) and throughput (``throughput_batch``) of the deployed model, fp32 and fp16."""
    cfg = config_for(size, plan)
    torch.manual_seed(0)
    model = dfine.build_model(cfg).to(plan.device).deploy()
    rows = []
    for precision in ("fp32", "fp16"):
        dtype = PRECISIONS[precision]

        def run(images: torch.Tensor, dtype: torch.dtype | None = dtype) -> Any:
            with (
                torch.no_grad(),
                torch.autocast(plan.device.type, dtype=dtype or torch.float32, enabled=bool(dtype)),
            ):
                return model(images)

        single = torch.rand(1, 3, plan.image_size, plan.image_size, device=plan.device)
        many = torch.rand(plan.throughput_batch, 3, plan.image_size, plan.image_size, device=plan.device)
        latency = _median_seconds(run, single, plan)
        throughput = plan.throughput_batch / _median_seconds(run, many, plan)
        rows.append(
            Row(
                "eval",
                f"{size.upper()} eval {precision}",
                {"latency ms": 1000 * latency, "img/s": throughput},
            )
        )
    return rows


def onnx_row(size: str, plan: Plan) -> Row:
    """Export the deployed model with post-processing and check it in onnxruntime on this device."""
    name = f"{size.upper()} ONNX"
    try:
        import onnxruntime
    except ImportError:
        return Row("onnx", name, {"skipped": "onnxruntime not installed"})
    provider = "CUDAExecutionProvider" if plan.device.type == "cuda" else "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        return Row("onnx", name, {"skipped": f"{provider} missing: pip install onnxruntime-gpu"})
    from dfine.deploy.export_check import check_onnx_parity
    from dfine.deploy.onnx_export import ExportableDetector, export_onnx, make_session

    cfg = config_for(size, plan)
    torch.manual_seed(0)
    model = dfine.build_model(cfg).eval()
    postprocessor = dfine.build_postprocessor(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(
            model,
            postprocessor,
            Path(folder) / "model.onnx",
            image_size=(plan.image_size,) * 2,
            dynamic_batch=True,
        )
        session = make_session(path, providers=[provider])
        reference = ExportableDetector(model, postprocessor).eval()
        images = torch.rand(
            2, 3, plan.image_size, plan.image_size, generator=torch.Generator().manual_seed(0)
        )
        sizes = torch.tensor([[plan.image_size, plan.image_size]] * 2)
        result = check_onnx_parity(path, reference, images, sizes, tolerance=1e-3, session=session)
    values = {"max difference": result.max_difference, "provider": provider}
    return Row("onnx", name, values, "" if result.passed else f"parity failed: {result}")


def original_rows(size: str, plan: Plan, batch: tuple, ours: dict[str, float]) -> list[Row]:
    """The original D-FINE's fp32 train img/s and eval latency, with our ratios (ours / original time)."""
    torch.manual_seed(0)
    model, criterion = original(size, plan.image_size)
    model.to(plan.device).train()
    criterion.to(plan.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = ModelEMA(model, warmups=10)
    images, targets = _on(batch, plan.device)
    runner = Runner("original", model, criterion, optimizer, ema)  # the step benchmark_train times
    for _ in range(plan.warmup):
        runner.step(images, targets, record=False)
    synchronize(plan.device)
    started = time.perf_counter()
    for _ in range(plan.steps):
        runner.step(images, targets, record=False)
    synchronize(plan.device)
    train_ips = plan.batch_size * plan.steps / (time.perf_counter() - started)
    deployed = model.deploy() if hasattr(model, "deploy") else model.eval()
    single = torch.rand(1, 3, plan.image_size, plan.image_size, device=plan.device)
    with torch.no_grad():
        latency = _median_seconds(deployed, single, plan)
    rows = [
        Row(
            "original",
            f"{size.upper()} original train fp32",
            {"img/s": train_ips, "ours/original time": train_ips / ours["train"]},
        ),
        Row(
            "original",
            f"{size.upper()} original eval fp32",
            {"latency ms": 1000 * latency, "ours/original time": ours["latency"] / latency},
        ),
    ]
    return rows


def run_size(size: str, plan: Plan) -> list[Row]:
    num_classes = int(config_for(size, plan)["num_classes"])
    batch = make_batch(plan.batch_size, plan.image_size, num_classes, seed=0)
    rows: list[Row] = []
    layouts = [layout for layout in LAYOUTS if layout != "compile" or plan.compile]
    for layout in layouts:  # compile last: it takes the longest and is the first to go over the budget
        for precision in PRECISIONS:
            if plan.out_of_time():
                rows.append(
                    Row("train", f"{size.upper()} train {precision} {layout}", {"skipped": "time budget"})
                )
                continue
            rows.append(train_variant(size, precision, layout, plan, batch))
    if not plan.compile:
        rows.append(
            Row("train", f"{size.upper()} train * compile", {"skipped": "--dry-run (use --dry-run-compile)"})
        )
    check_losses(rows, plan.loss_tolerance)
    rows += eval_rows(size, plan)
    rows.append(onnx_row(size, plan))
    if os.environ.get("DFINE_ORIG_DIR") and not plan.out_of_time():
        fastest = {
            "train": max(
                r.values.get("img/s", 0) for r in rows if r.section == "train" and " fp32 " in r.name
            ),
            "latency": next(r.values["latency ms"] / 1000 for r in rows if r.name.endswith("eval fp32")),
        }
        rows += original_rows(size, plan, batch, fastest)
    return rows


def _format(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{key} {_format(item)}" for key, item in value.items())
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def print_table(rows: list[Row], plan: Plan) -> None:
    device = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "CPU (dry run)"
    side = plan.image_size
    print(f"\n{device}; {side}x{side}, train batch {plan.batch_size}, {plan.steps} timed steps")
    for row in rows:
        values = "  ".join(f"{key} {_format(value)}" for key, value in row.values.items())
        flag = f"  FAIL: {row.problem}" if row.problem else ""
        print(f"{row.name:34s} {values}{flag}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["n", "s"], choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--loss-tolerance", type=float, default=0.05)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--dry-run", action="store_true", help="CPU, quickstart model at 96x96, a few steps")
    parser.add_argument(
        "--dry-run-compile", action="store_true", help="with --dry-run: include torch.compile"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        plan = Plan(
            device=torch.device("cpu"),
            sizes=["quickstart"],
            image_size=96,
            batch_size=2,
            steps=2,
            warmup=1,
            repeats=1,
            throughput_batch=2,
            budget_s=args.budget_s,
            loss_tolerance=args.loss_tolerance,
            compile=args.dry_run_compile,
            overrides=("model.decoder.num_queries=30",),  # 96x96 has 45 encoder cells
        )
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; run with --dry-run to check the script on a CPU")
            return 2
        plan = Plan(
            device=torch.device("cuda"),
            sizes=args.sizes,
            image_size=640,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=5,
            repeats=30,
            throughput_batch=32,
            budget_s=args.budget_s,
            loss_tolerance=args.loss_tolerance,
            compile=True,
        )
    rows = [row for size in plan.sizes for row in run_size(size, plan)]
    print_table(rows, plan)
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    failed = [row for row in rows if row.problem]
    print(f"\n{len(failed)} problem(s); {time.perf_counter() - plan.started:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
