"""Distributed helpers: single-process fall-backs, rank-0-only logging, and a real 2-process gloo job
(launched with the environment torchrun sets) where gathers and the evaluator give no duplicates."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dfine import distributed
from dfine.evaluation.coco_evaluator import CocoEvaluator

TIMEOUT_SECONDS = 180


def test_without_torchrun_everything_is_a_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = distributed.init_distributed("cpu")
    assert (context.rank, context.world_size, context.backend) == (0, 1, None)
    assert distributed.is_main_process() and distributed.get_world_size() == 1
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.reduce_dict_for_logging({"loss": torch.tensor(2.5), "aux": 1.0}) == {
        "aux": 1.0,
        "loss": 2.5,
    }
    torch.testing.assert_close(distributed.all_reduce_mean(torch.tensor([3.0])), torch.tensor([3.0]))
    distributed.barrier()
    distributed.cleanup()


def test_logging_handlers_go_on_rank_zero_only(tmp_path: Path):
    package_logger = logging.getLogger("dfine")
    try:
        distributed.setup_logging(tmp_path, rank=0)
        logging.getLogger("dfine.engine.test").info("hello from rank 0")
        assert "hello from rank 0" in (tmp_path / "train.log").read_text()
        distributed.setup_logging(tmp_path / "rank1", rank=1)
        assert not (tmp_path / "rank1").exists()
        assert len(package_logger.handlers) == 1
        assert package_logger.handlers[0].level == logging.NOTSET and package_logger.level == logging.ERROR
    finally:
        for handler in list(package_logger.handlers):
            package_logger.removeHandler(handler)
            handler.close()
        package_logger.setLevel(logging.NOTSET)


GROUND_TRUTH = {
    "images": [{"id": i, "width": 100, "height": 100} for i in range(1, 6)],
    "categories": [{"id": 3, "name": "a"}, {"id": 8, "name": "b"}],
    "annotations": [
        {
            "id": i,
            "image_id": i,
            "category_id": 3 if i % 2 else 8,
            "bbox": [10, 10, 30, 20],
            "area": 600,
            "iscrowd": 0,
        }
        for i in range(1, 6)
    ],
}
# Image 5 is found, 1-3 roughly, 4 with the wrong class.
PREDICTIONS = {
    1: {"boxes": [[10, 10, 40, 30]], "scores": [0.9], "labels": [3]},
    2: {"boxes": [[12, 10, 40, 31], [50, 50, 60, 60]], "scores": [0.8, 0.7], "labels": [8, 8]},
    3: {"boxes": [[15, 12, 42, 30]], "scores": [0.6], "labels": [3]},
    4: {"boxes": [[10, 10, 40, 30]], "scores": [0.95], "labels": [3]},
    5: {"boxes": [[10, 10, 40, 30]], "scores": [0.5], "labels": [3]},
}

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from dfine import distributed
    from dfine.evaluation.coco_evaluator import CocoEvaluator

    ground_truth, predictions = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
    out_dir = sys.argv[3]
    context = distributed.init_distributed("cpu")
    rank = context.rank
    out = {"context": [context.rank, context.world_size, context.backend]}
    out["gathered"] = distributed.all_gather_object({"rank": rank})
    out["sum"] = distributed.all_reduce_sum(torch.tensor([rank + 1.0])).tolist()
    out["mean"] = distributed.all_reduce_mean(torch.tensor([rank + 1.0])).tolist()
    out["logged"] = distributed.reduce_dict_for_logging({"loss": torch.tensor(float(rank)), "aux": 2.0})
    out["broadcast"] = distributed.broadcast_object(f"from rank {rank}")

    # A padded sampler serves image 1 to both ranks; rank 1's copy must not count twice.
    evaluator = CocoEvaluator(ground_truth)
    images = [1, 3, 5] if rank == 0 else [2, 4, 1]
    evaluator.update({i: {k: torch.tensor(v) for k, v in predictions[str(i)].items()} for i in images})
    out["metrics"] = evaluator.summarize()
    out["num_results"] = len(evaluator.to_coco_results())
    out["image_ids"] = evaluator.image_ids

    distributed.barrier()
    json.dump(out, open(f"{out_dir}/rank{rank}.json", "w"))
    distributed.cleanup()
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.dist
def test_two_gloo_processes_gather_without_duplicates_and_match_single_process_ap(tmp_path: Path):
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "gt.json").write_text(json.dumps(GROUND_TRUTH))
    (tmp_path / "predictions.json").write_text(json.dumps(PREDICTIONS))
    port = free_port()
    processes = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        command = [
            sys.executable,
            str(tmp_path / "worker.py"),
            *(str(tmp_path / n) for n in ("gt.json", "predictions.json")),
        ]
        processes.append(subprocess.Popen([*command, str(tmp_path)], env=env, stderr=subprocess.PIPE))
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=TIMEOUT_SECONDS)
            assert process.returncode == 0, stderr.decode()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()

    outputs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    single = CocoEvaluator(GROUND_TRUTH)
    single.update({i: {k: torch.tensor(v) for k, v in p.items()} for i, p in PREDICTIONS.items()})
    expected_metrics = single.summarize()
    for rank, out in enumerate(outputs):
        assert out["context"] == [rank, 2, "gloo"]
        assert out["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert out["sum"] == [3.0] and out["mean"] == [1.5]
        assert out["logged"] == {"aux": 2.0, "loss": 0.5}
        assert out["broadcast"] == "from rank 0"
        assert out["image_ids"] == [1, 2, 3, 4, 5]
        assert out["num_results"] == (
            6 if rank == 0 else 0
        )  # image 1 once, not twice; rows reach rank 0 only
        assert out["metrics"] == pytest.approx(expected_metrics)
