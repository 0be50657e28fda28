"""Eval latency (batch 1) and throughput (batch 16) of our D-FINE on several backends, HF port as reference.

Every backend of a size gets the same realistic weights (dfine.models.realistic_weights) and the same input.
Backends:

    hf             HuggingFace DFineForObjectDetection, eager fp32: the reference of the ratios
    eager          ours, eval mode, fp32, no deploy()
    deploy         ours after deploy() (BatchNorm folded, branches merged), NCHW memory
    channels-last  deploy() as it ships: NHWC memory (oneDNN's fast layout on CPU)
    compile        torch.compile of the channels-last model (compile time excluded, printed)
    bf16, fp16     torch.autocast of the channels-last model; run by default only where the device has
                   native support (CPU: oneDNN bf16/fp16 kernels; CUDA: always fp16, bf16 from Ampere on).
                   Asked for by name without it, they run emulated (~8x slower on an AVX2 CPU) and say so
    onnxruntime    dfine.deploy.onnx_export.export_onnx (raw outputs, dynamic batch), one session, --threads
    original       the original D-FINE after its deploy() (with --original; DFINE_ORIG_DIR or ../orig)

After one warm-up round, the backends are timed in interleaved rounds (one call of each per round), so load
from other processes on a shared machine spreads over all of them alike. A backend that cannot run here is
skipped with the reason. Eager fp32 always runs (dropped from the table unless named): the "score gap" column
is the largest difference of each backend's sorted top scores from its outputs.

Run time at 640x640 with the default repeats, on 1 thread of a 2-core CPU busy with another job: N about
10 min, S about 15 min; torch.compile takes ~4 min of that per size (it compiles for both batch sizes) and the
batch-16 rounds most of the rest. ``--backends hf channels-last onnxruntime --throughput-batch 0`` gives the
latency alone in about a minute. On a busy machine prefer ``--threads 1``: with every core taken, a 2-thread
PyTorch run measured 3-4x slower than a 1-thread one (each parallel region waits for its slowest thread).
Examples::

    python tools/benchmark_model.py --sizes n --threads 2
    python tools/benchmark_model.py --sizes n s --backends hf channels-last onnxruntime --repeats 20
    python tools/benchmark_model.py --sizes s --backends hf eager bf16 --throughput-batch 0
    python tools/benchmark_model.py --sizes n --device cuda --throughput-batch 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

import dfine
from dfine.models.realistic_weights import random_images, realistic_state_dict

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("hf", "eager", "deploy", "channels-last", "compile", "bf16", "fp16", "onnxruntime")
Outputs = dict[str, Tensor]


class Unavailable(RuntimeError):
    """A backend cannot run on this machine; the message says why."""


@dataclass
class Backend:
    name: str
    run: Callable[[Tensor], Outputs]
    note: str = ""
    times: dict[int, list[float]] = field(default_factory=dict)  # batch size -> seconds per call
    gap: str = "n/a"  # largest sorted-score gap to eager fp32 at batch 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_low_precision(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    mkldnn = torch.ops.mkldnn
    return bool(
        mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported()
    )


def load_config(size: str, image_size: int) -> dict:
    return dfine.load_config(
        ROOT / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml",
        [f"eval_spatial_size=[{image_size}, {image_size}]"],
    )


def our_model(cfg: dict, weights: dict[str, Tensor], device: torch.device, form: str) -> nn.Module:
    """Ours in ``form``: "eager" (eval, unfused), "deploy" (fused, NCHW) or "channels-last" (as deployed)."""
    model = dfine.build_model(cfg)
    model.load_state_dict(weights)
    model.to(device).eval()
    if form != "eager":
        model.deploy()
    if form == "deploy":
        model.use_channels_last(False)
    return model


def hf_backend(cfg: dict, weights: dict[str, Tensor], device: torch.device) -> Backend:
    try:
        from transformers import DFineForObjectDetection

        from dfine.hf.conversion import dfine_to_hf_state_dict, hf_config_from_dfine_config
    except ImportError as error:
        raise Unavailable(f"transformers is not installed ({error})") from error
    hf = DFineForObjectDetection(hf_config_from_dfine_config(cfg))
    hf.load_state_dict(dfine_to_hf_state_dict(weights, cfg), strict=True)
    hf.to(device).eval()

    def run(images: Tensor) -> Outputs:
        out = hf(pixel_values=images)
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}

    return Backend("hf", run, "HF DFineForObjectDetection, fp32")


def autocast_backend(model: nn.Module, device: torch.device, name: str) -> Backend:
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    native = native_low_precision(device, dtype)

    def run(images: Tensor) -> Outputs:
        with torch.autocast(device.type, dtype=dtype):
            out = model(images)
        return {key: out[key].float() for key in ("pred_logits", "pred_boxes")}

    kind = "native" if native else f"EMULATED: no native {name} on this {device.type.upper()}"
    return Backend(name, run, f"{name} autocast, channels-last ({kind})")


def onnxruntime_backend(cfg: dict, weights: dict[str, Tensor], args: argparse.Namespace, folder: Path):
    try:
        from dfine.deploy.onnx_export import export_onnx, make_session, require_onnx
    except ImportError as error:
        raise Unavailable(f"dfine.deploy.onnx_export is not available ({error})") from error
    try:
        _, runtime = require_onnx()
    except ImportError as error:
        raise Unavailable(str(error)) from error
    providers = ["CPUExecutionProvider"]
    if args.device == "cuda":
        if "CUDAExecutionProvider" not in runtime.get_available_providers():
            raise Unavailable("onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        providers = ["CUDAExecutionProvider"]
    model = dfine.build_model(cfg)
    model.load_state_dict(weights)
    side = args.image_size
    path = export_onnx(model, None, folder / "model.onnx", image_size=(side, side), dynamic_batch=True)
    session = make_session(path, num_threads=args.threads, providers=providers)

    def run(images: Tensor) -> Outputs:
        logits, boxes = session.run(None, {"images": images.cpu().numpy()})
        return {"pred_logits": torch.from_numpy(logits), "pred_boxes": torch.from_numpy(boxes)}

    where = "CUDA" if args.device == "cuda" else f"CPU, {args.threads} thread{'s' * (args.threads != 1)}"
    return Backend("onnxruntime", run, f"onnxruntime {runtime.__version__} ({where}), fp32")


def original_backend(size: str, weights: dict[str, Tensor], side: int, device: torch.device) -> Backend:
    orig_dir = Path(os.environ.get("DFINE_ORIG_DIR", ROOT.parent / "orig")).resolve()
    if not (orig_dir / "src" / "core").is_dir():
        raise Unavailable(f"no original D-FINE checkout at {orig_dir} (set DFINE_ORIG_DIR)")
    sys.path.insert(0, str(orig_dir))
    from src.core import YAMLConfig

    original = YAMLConfig(
        str(orig_dir / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml"),
        HGNetv2={"pretrained": False},
        eval_spatial_size=[side, side],
    ).model
    original.load_state_dict(weights)
    original.to(device).eval().deploy()
    return Backend("original", original, "original D-FINE, deploy(), fp32")


def make_backend(name: str, size: str, cfg: dict, weights: dict, args: argparse.Namespace, folder: Path):
    device = torch.device(args.device)
    if name == "hf":
        return hf_backend(cfg, weights, device)
    if name == "original":
        return original_backend(size, weights, args.image_size, device)
    if name == "onnxruntime":
        return onnxruntime_backend(cfg, weights, args, folder)
    if name in ("eager", "deploy", "channels-last"):
        notes = {"eager": "eval, no deploy()", "deploy": "deploy(), NCHW", "channels-last": "deploy(), NHWC"}
        return Backend(name, our_model(cfg, weights, device, name), f"ours, {notes[name]}, fp32")
    model = our_model(cfg, weights, device, "channels-last")
    if name == "compile":
        return Backend(name, torch.compile(model, dynamic=False), "ours, torch.compile(deploy()), fp32")
    return autocast_backend(model, device, name)


def call_seconds(backend: Backend, images: Tensor, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    backend.run(images)
    synchronize(device)
    return time.perf_counter() - start


def score_gap(outputs: Outputs, reference: Outputs) -> str:
    """Largest difference of the sorted top scores (robust to near-tied queries that swap places)."""
    ours = outputs["pred_logits"].float().cpu().sigmoid().amax(-1).sort(-1).values
    theirs = reference["pred_logits"].float().cpu().sigmoid().amax(-1).sort(-1).values
    return f"{(ours - theirs).abs().max().item():.0e}"


def warm_up(backends: list[Backend], batches: dict[int, Tensor], args: argparse.Namespace) -> list[Backend]:
    """Run every backend ``--warmup`` times per batch size; drop (and report) those that fail."""
    device = torch.device(args.device)
    ready, first_outputs = [], {}
    for backend in backends:
        try:
            start = time.perf_counter()
            for images in batches.values():
                for _ in range(args.warmup):
                    backend.run(images)
            if backend.name == "compile":
                backend.note += f"; compiled in {time.perf_counter() - start:.0f} s"
            first_outputs[backend.name] = backend.run(batches[1])
        except Exception as error:  # torch.compile and exporters fail in many ways; report, keep going
            print(f"  skipped {backend.name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
            continue
        ready.append(backend)
    if "eager" in first_outputs:
        for backend in ready:
            backend.gap = score_gap(first_outputs[backend.name], first_outputs["eager"])
    synchronize(device)
    return ready


def measure(backends: list[Backend], batches: dict[int, Tensor], args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    for batch_size, images in batches.items():
        repeats = args.repeats if batch_size == 1 else args.throughput_repeats
        for _ in range(repeats):
            for backend in backends:
                backend.times.setdefault(batch_size, []).append(call_seconds(backend, images, device))


def benchmark_size(size: str, args: argparse.Namespace) -> list[Backend]:
    cfg = load_config(size, args.image_size)
    weights = realistic_state_dict(dfine.build_model(cfg), seed=0)
    batches = {1: random_images(1, args.image_size, args.image_size).to(args.device)}
    if args.throughput_batch > 1:
        batches[args.throughput_batch] = random_images(
            args.throughput_batch, args.image_size, args.image_size, seed=1
        ).to(args.device)
    device = torch.device(args.device)
    names = [name for name in args.backends if name != "eager"]
    names = ["eager", *names]  # eager fp32 is the accuracy reference: build and warm it first
    backends = []
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for name in names:
            if name in ("bf16", "fp16") and not args.explicit_backends:
                dtype = torch.bfloat16 if name == "bf16" else torch.float16
                if not native_low_precision(device, dtype):
                    print(f"  skipped {name}: no native {name} on this {device.type} (name it to force it)")
                    continue
            try:
                backends.append(make_backend(name, size, cfg, weights, args, Path(folder)))
            except Unavailable as error:
                print(f"  skipped {name}: {error}")
        backends = warm_up(backends, batches, args)
        measure(backends, batches, args)
    if "eager" not in args.backends:
        backends = [backend for backend in backends if backend.name != "eager"]
    return backends


def print_table(results: dict[str, list[Backend]], args: argparse.Namespace) -> None:
    batch = args.throughput_batch if args.throughput_batch > 1 else None
    where = f"{args.threads} thread{'s' * (args.threads != 1)}" if args.device == "cpu" else args.device
    load = "" if args.load_before is None else f", 1-minute load average at start {args.load_before:.1f}"
    print(
        f"\nD-FINE eval at {args.image_size}x{args.image_size}, {where}{load}. Latency: median of "
        f"{args.repeats} calls at batch 1"
        + (f"; throughput: median of {args.throughput_repeats} calls at batch {batch}" if batch else "")
        + ". vs HF: speed-up over the HF port (>1 = faster). Score gap: vs eager fp32 at batch 1.\n"
    )
    header = ["size", "backend", "ms, batch 1", "vs HF"]
    header += [f"img/s, batch {batch}", "vs HF"] if batch else []
    header += ["score gap", "details"]
    print("| " + " | ".join(header) + " |")
    print("| --- | --- | " + " | ".join("---:" for _ in header[2:-1]) + " | --- |")
    for size, backends in results.items():
        medians = {b.name: {bs: statistics.median(t) for bs, t in b.times.items()} for b in backends}
        reference = medians.get("hf", {})
        for backend in backends:
            seconds = medians[backend.name]
            cells = [f"{seconds[1] * 1000:.1f}", f"{reference[1] / seconds[1]:.2f}" if reference else "-"]
            if batch:
                speed_up = f"{reference[batch] / seconds[batch]:.2f}" if reference else "-"
                cells += [f"{batch / seconds[batch]:.1f}", speed_up]
            row = [f"D-FINE-{size.upper()}", backend.name, *cells, backend.gap, backend.note]
            print("| " + " | ".join(row) + " |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", "--size", nargs="+", default=["n"], choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--backends", nargs="+", choices=[*BACKENDS, "original"], help="default: all")
    parser.add_argument("--original", action="store_true", help="add the original D-FINE (DFINE_ORIG_DIR)")
    parser.add_argument("--image-size", type=int, default=640, help="square side in pixels (multiple of 32)")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10, help="timed batch-1 calls per backend")
    parser.add_argument("--throughput-batch", type=int, default=16, help="0 or 1: latency only")
    parser.add_argument("--throughput-repeats", type=int, default=3, help="timed batch calls per backend")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per backend and batch size")
    args = parser.parse_args(argv)
    args.explicit_backends = args.backends is not None
    args.backends = list(args.backends or BACKENDS) + (["original"] if args.original else [])
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (torch.compile compiles during the first calls)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # the machine may be shared: other processes' load skews timings (and multi-thread ones the most)
    args.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch.set_num_threads(args.threads)
    results = {}
    for size in args.sizes:
        print(f"D-FINE-{size.upper()}: building and warming up {len(args.backends)} backends")
        results[size] = benchmark_size(size, args)
    print_table(results, args)


if __name__ == "__main__":
    main()
