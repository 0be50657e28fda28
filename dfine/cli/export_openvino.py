"""``dfine-export --format openvino``: the IR beside the ONNX file, its parity check, a 3-runtime benchmark.

Kept apart from ``dfine.cli.export`` so that the ONNX path reads on its own; called from its ``_main``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["benchmark_three_runtimes", "export_and_check_openvino"]


def export_and_check_openvino(
    onnx_path: Path,
    reference: Any,
    images: Any,
    sizes: Any,
    args: argparse.Namespace,
    metadata: Mapping[str, str],
    passed: bool,
) -> bool:
    """Convert ``onnx_path`` to ``<same name>.xml`` + ``.bin``, check it like the ONNX file, time it.

    Returns:
        ``passed`` and whether OpenVINO matched PyTorch within ``--tolerance`` at every batch checked.
    """
    from dfine.cli.export import _check_batches
    from dfine.deploy.openvino_export import OpenVinoSession, convert_onnx_to_openvino

    xml_path = convert_onnx_to_openvino(onnx_path, onnx_path.with_suffix(".xml"), metadata)
    print(f"wrote {xml_path} and {xml_path.with_suffix('.bin').name} (OpenVINO IR, fp32)")
    session = OpenVinoSession(xml_path, num_threads=args.threads)
    passed = _check_batches(xml_path, reference, images, sizes, args, ["CPU"], session=session) and passed
    if args.benchmark:
        benchmark_three_runtimes(onnx_path, session, reference, images, sizes, args)
    return passed


def benchmark_three_runtimes(
    onnx_path: Path, session: Any, reference: Any, images: Any, sizes: Any, args: argparse.Namespace
) -> None:
    """Model latency (in-graph post-processing included) in PyTorch, onnxruntime and OpenVINO side by side."""
    import torch

    from dfine.deploy.export_check import benchmark_runtimes, repeat_to_batch
    from dfine.deploy.onnx_export import make_session

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ort_session = make_session(onnx_path, num_threads=args.threads, spinning=False)
    threads = args.threads if args.threads is not None else "all"
    print(f"model latency, {threads} threads (PyTorch eager, deployed form; same inputs for all):")
    for batch_size in (1, 8) if args.dynamic_batch else (1,):
        batch, batch_sizes = repeat_to_batch(images.cpu(), None if args.no_postprocess else sizes, batch_size)
        feed = {"images": batch.numpy()}
        torch_inputs: tuple[Any, ...] = (batch,)
        if batch_sizes is not None:
            feed["orig_target_sizes"] = batch_sizes.round().to(torch.int64).numpy()
            torch_inputs += (batch_sizes.round().to(torch.int64),)

        def run_torch(inputs: tuple[Any, ...] = torch_inputs) -> Any:
            with torch.no_grad():
                return reference(*inputs)

        timings = benchmark_runtimes(
            {
                "PyTorch": run_torch,
                "onnxruntime": lambda feed=feed: ort_session.run(None, feed),
                "OpenVINO": lambda feed=feed: session.run(None, feed),
            },
            batch_size,
            warmup=min(3, args.iterations),
            iterations=args.iterations,
        )
        base = timings["onnxruntime"].median_ms
        for name, stats in timings.items():
            ratio = base / stats.median_ms
            print(f"  batch {batch_size} {name:<12} {stats.summary()}  x{ratio:.2f} vs onnxruntime")
