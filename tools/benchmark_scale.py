"""Annotation loading at real scale: json.load / pycocotools against dfine's streamed build and its cache.

Make the files once (tools/dataset/make_synthetic_coco.py), then::

    python tools/benchmark_scale.py /work/scale/coco_train.json /work/scale/o365.json

Each measurement runs in a fresh process (peak RSS is the process's own ``ru_maxrss``; the interpreter with
dfine and torch imported is reported as ``import``). Columns:

* ``json.load`` / ``pycocotools``: the reference every process pays today (skipped above
  ``--max-reference-mb``; then extrapolated linearly from the largest file measured, marked ``~``).
* ``build``: dfine's first use (streamed parse + cache write).
* ``cached``: a later start (maps the cache).
* ``4 procs``: four processes mapping the cache at once: slowest start, sum of PSS.
* ``worker``: PSS growth of one DataLoader worker over 10k random reads of the table, mapped vs in memory
  (the in-memory table is what a forked worker copies page by page as it touches Python/numpy objects).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

_MB = 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, path: str) -> dict[str, float]:
    """One measurement, in this (fresh) process."""
    import psutil

    start = time.perf_counter()
    if mode == "json":
        with open(path, encoding="utf-8") as file:
            json.load(file)
        return {"s": time.perf_counter() - start, "peak_mb": _peak_mb()}
    if mode == "pycocotools":
        from pycocotools.coco import COCO

        COCO(path)
        return {"s": time.perf_counter() - start, "peak_mb": _peak_mb()}
    from dfine.data.coco import parse_coco

    base = _peak_mb()
    if mode in ("build", "cached", "memory"):
        start = time.perf_counter()
        parse_coco(path)
        result = {"s": time.perf_counter() - start, "peak_mb": _peak_mb(), "import_mb": base}
        result["rss_mb"] = psutil.Process().memory_info().rss / _MB
        result["pss_mb"] = psutil.Process().memory_full_info().pss / _MB
        return result
    if mode in ("worker", "worker_memory"):
        return _worker_growth(path)
    raise ValueError(mode)


def _worker_growth(path: str) -> dict[str, float]:
    import numpy as np
    import psutil
    import torch
    from torch.utils.data import DataLoader, Dataset

    from dfine.data.base import boxes_for_image
    from dfine.data.coco import parse_coco

    table, label_map, _ = parse_coco(path)

    class Reads(Dataset):
        def __len__(self) -> int:
            return 10_001

        def __getitem__(self, index: int) -> torch.Tensor:
            row = int(np.random.randint(len(table)))
            _, labels = boxes_for_image(table, row, 640, 640, label_map)
            table.file_name(row)
            if index in (0, 10_000):
                return torch.tensor([psutil.Process().memory_full_info().pss / _MB, _anonymous_mb()])
            return torch.tensor([float(len(labels)), 0.0])

    values = [v.tolist() for v in DataLoader(Reads(), batch_size=None, num_workers=1)]
    return {"growth_mb": values[-1][0] - values[0][0], "anon_growth_mb": values[-1][1] - values[0][1]}


def _anonymous_mb() -> float:
    """Private copies (anonymous pages): what copy-on-access growth is made of; mapped file pages are not."""
    with open("/proc/self/smaps_rollup") as file:
        for line in file:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run(mode: str, path: str, env: dict[str, str] | None = None) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--child", mode, path],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def _four(path: str) -> dict[str, float]:
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", "cached", path], stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in processes]
    return {
        "wall_s": time.perf_counter() - start,
        "max_s": max(r["s"] for r in results),
        "max_rss_mb": max(r["rss_mb"] for r in results),
        "sum_pss_mb": sum(r["pss_mb"] for r in results),
    }


def _image_check(ann: str, img_dir: str) -> None:
    import glob
    import logging

    from dfine.data import CocoDetection, check_dataset

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for stale in glob.glob(ann + ".dfine-cache.*-checks.npz"):
        os.unlink(stale)
    dataset = CocoDetection(img_dir, ann)
    for mode in ("exists", "header", "header", "decode", "decode"):
        start = time.perf_counter()
        report = check_dataset(dataset, images=mode)
        print(
            f"{mode:>7}: {len(dataset)} files in {time.perf_counter() - start:.1f} s, "
            f"truncated {report.count('truncated')}, missing {report.count('missing')}",
            flush=True,
        )


def _gather_rank(rank: int, world: int, port: int, images: int, per_image: int, mode: str, out: str) -> None:
    """One of ``world`` gloo ranks: synthetic detections of its share of images, then gather (+ score)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from dfine import distributed
    from dfine.evaluation.coco_evaluator import CocoEvaluator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank))
    distributed.init_distributed("cpu")
    rng = np.random.default_rng(rank)
    ground_truth = {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(1, images + 1)
        ],
        "annotations": [
            {
                "id": i,
                "image_id": i,
                "category_id": 1 + i % 365,
                "bbox": [10, 10, 50, 40],
                "area": 2000,
                "iscrowd": 0,
            }
            for i in range(1, images + 1)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 366)],
    }
    evaluator = CocoEvaluator(ground_truth, max_detections=100)
    for image_id in range(1 + rank, images + 1, world):
        xy = rng.random((per_image, 2), dtype=np.float32) * 500
        evaluator.update(
            {
                image_id: {
                    "boxes": torch.from_numpy(np.concatenate([xy, xy + 40], axis=1)),
                    "scores": torch.from_numpy(rng.random(per_image, dtype=np.float32)),
                    "labels": torch.from_numpy(rng.integers(1, 366, per_image)),
                }
            }
        )
    dist.barrier()
    before = _peak_mb()
    start = time.perf_counter()
    if mode == "old":  # what evaluation did before: every rank pickles its dict to every rank
        gathered = distributed.all_gather_object(evaluator._detections)
        del gathered
    else:
        evaluator.synchronize()
    gather_s = time.perf_counter() - start
    gather_peak = _peak_mb()
    result = {"gather_s": gather_s, "rss_before_mb": before, "gather_peak_mb": gather_peak}
    if mode == "score" and rank == 0:
        start = time.perf_counter()
        evaluator.summarize()
        result.update(score_s=time.perf_counter() - start, score_peak_mb=_peak_mb())
    elif mode == "score":
        evaluator.summarize()
    if rank == 0:
        with open(out, "w") as file:
            json.dump(result, file)
    distributed.cleanup()


def _gather(images: int, per_image: int, mode: str) -> dict[str, float]:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tempfile.mktemp(suffix=".json")
    mp.spawn(_gather_rank, args=(4, port, images, per_image, mode, out), nprocs=4, join=True)
    with open(out) as file:
        return json.load(file)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="*")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--image-check",
        nargs=2,
        metavar=("ANN", "IMG_DIR"),
        help="instead: time check_dataset's header and decode modes over these images, first and second run",
    )
    parser.add_argument(
        "--gather",
        nargs=3,
        metavar=("IMAGES", "PER_IMAGE", "MODE"),
        help="instead: 4 gloo ranks gather synthetic detections; MODE old (all_gather_object), new, score",
    )
    parser.add_argument("--max-reference-mb", type=float, default=1000, help="skip json.load above this size")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    if args.gather:
        images, per_image, mode = args.gather
        print(
            json.dumps(
                {
                    "images": images,
                    "per_image": per_image,
                    "mode": mode,
                    **_gather(int(images), int(per_image), mode),
                }
            )
        )
        return
    if args.image_check:
        _image_check(*args.image_check)
        return
    rows, per_mb = [], {}
    for path in args.files:
        size_mb = os.path.getsize(path) / _MB
        row = {"file": os.path.basename(path), "MB": size_mb}
        for reference in ("json", "pycocotools"):
            if size_mb <= args.max_reference_mb:
                measured = _run(reference, path)
                per_mb[reference] = (
                    measured["s"] / size_mb,
                    measured["peak_mb"] / size_mb,
                )  # largest measured
                row[reference] = f"{measured['s']:.1f} s / {measured['peak_mb']:.0f} MB"
            elif reference in per_mb:
                s, mb = per_mb[reference]
                row[reference] = f"~{s * size_mb:.0f} s / ~{mb * size_mb:.0f} MB"
        for suffix in (".dfine-cache", ".dfine-cache.lock"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        build = _run("build", path)
        row["import"] = f"{build['import_mb']:.0f} MB"
        row["build"] = f"{build['s']:.1f} s / {build['peak_mb']:.0f} MB"
        cached = _run("cached", path)
        row["cached"] = f"{cached['s']:.2f} s / RSS {cached['rss_mb']:.0f} MB"
        four = _four(path)
        row["4 procs"] = (
            f"max {four['max_s']:.2f} s, RSS<={four['max_rss_mb']:.0f} MB, "
            f"PSS sum {four['sum_pss_mb']:.0f} MB"
        )
        worker = _run("worker", path)
        memory = _run("worker", path, {"DFINE_ANNOTATION_CACHE": "0"})
        row["worker +PSS/10k"] = (
            f"mapped {worker['growth_mb']:.1f} MB (anonymous {worker['anon_growth_mb']:.1f}), "
            f"in memory {memory['growth_mb']:.1f} MB (anonymous {memory['anon_growth_mb']:.1f})"
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    for row in rows:
        print(f"== {row.pop('file')} ({row.pop('MB'):.0f} MB)")
        for key, value in row.items():
            print(f"  {key:>16}: {value}")


if __name__ == "__main__":
    main()
