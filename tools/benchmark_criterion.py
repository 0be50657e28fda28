"""Time the D-FINE criterion (matching + losses, forward and backward): ours next to the original's.

The output dict is the original N model's training output at batch 4 (realistic weights, as in
tools/make_criterion_fixture.py) when the original checkout is available, otherwise a synthetic dict of the
same layout and sizes (300 queries, 80 classes, 3 decoder layers, reg_max 32, denoising groups). Both criteria
score leaf copies of the same dict; the backward pass runs down to those leaves only.

Usage::

    DFINE_ORIG_DIR=../D-FINE python tools/benchmark_criterion.py              # ours vs original
    python tools/benchmark_criterion.py --repeats 20 --boxes 30               # ours only (no checkout)
    DFINE_ORIG_DIR=../D-FINE python tools/benchmark_criterion.py --model-step # + the original model's share
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from make_criterion_fixture import (
    build_original,
    clone_outputs,
    find_original,
    make_targets,
    perturb_weights,
    run_model,
)

from dfine.losses import DFINECriterion, HungarianMatcher
from dfine.ops.fdr import distance_to_box, distribution_integral, weighting_function

NUM_CLASSES, NUM_QUERIES, REG_MAX = 80, 300, 32


def our_criterion() -> DFINECriterion:
    matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}, alpha=0.25, gamma=2.0)
    weights = {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
    return DFINECriterion(
        matcher,
        weights,
        ["vfl", "boxes", "local"],
        alpha=0.75,
        gamma=2.0,
        num_classes=NUM_CLASSES,
        reg_max=REG_MAX,
    )


def synthetic_outputs(sizes: list[int], seed: int = 0) -> dict[str, Any]:
    """Random tensors in the original's training-output layout (3 layers, denoising groups as the model's)."""
    generator = torch.Generator().manual_seed(seed)
    batch, bins = len(sizes), REG_MAX + 1
    up, reg_scale = torch.tensor([0.5]), torch.tensor([4])
    project = weighting_function(REG_MAX, up, reg_scale)

    def layers(num_queries: int) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        ref = torch.cat(
            (
                0.2 + 0.6 * torch.rand(batch, num_queries, 2, generator=generator),
                0.05 + 0.3 * torch.rand(batch, num_queries, 2, generator=generator),
            ),
            -1,
        )
        result = []
        for _ in range(3):
            corners = torch.randn(batch, num_queries, 4 * bins, generator=generator).requires_grad_()
            boxes = distance_to_box(ref, distribution_integral(corners, project), reg_scale)
            logits = (torch.randn(batch, num_queries, NUM_CLASSES, generator=generator) - 4).requires_grad_()
            result.append(
                {"pred_logits": logits, "pred_boxes": boxes, "pred_corners": corners, "ref_points": ref}
            )
        for layer in result:
            layer.update(teacher_corners=result[-1]["pred_corners"], teacher_logits=result[-1]["pred_logits"])
        pre = {
            "pred_logits": (
                torch.randn(batch, num_queries, NUM_CLASSES, generator=generator) - 4
            ).requires_grad_(),
            "pred_boxes": ref.clone().requires_grad_(),
        }
        return result, pre

    main, pre = layers(NUM_QUERIES)
    outputs = {k: v for k, v in main[-1].items() if not k.startswith("teacher")}
    outputs.update(up=up, reg_scale=reg_scale, aux_outputs=main[:-1], pre_outputs=pre)
    outputs["enc_aux_outputs"] = [{"pred_logits": pre["pred_logits"] + 0.1, "pred_boxes": pre["pred_boxes"]}]
    outputs["enc_meta"] = {"class_agnostic": False}
    most = max(sizes)
    groups = max(100 // most, 1)
    dn, dn_pre = layers(2 * most * groups)
    positive = tuple(torch.cat([torch.arange(n) + 2 * most * g for g in range(groups)]) for n in sizes)
    outputs.update(dn_outputs=dn, dn_pre_outputs=dn_pre)
    outputs["dn_meta"] = {
        "dn_positive_idx": positive,
        "dn_num_group": groups,
        "dn_num_split": [2 * most * groups, 300],
    }
    return outputs


def time_criteria(
    criteria: dict[str, Callable], outputs: dict[str, Any], targets: list, repeats: int
) -> dict[str, list[float]]:
    """Seconds of forward + backward per repeat for each criterion, interleaved so that load from other
    processes hits all of them alike; fresh leaf copies each time (copying not timed), one warm-up call."""
    times: dict[str, list[float]] = {name: [] for name in criteria}
    for repeat in range(repeats + 1):
        for name, criterion in criteria.items():
            leaves = clone_outputs(outputs)
            start = time.perf_counter()
            losses = criterion(leaves, targets)
            sum(losses.values()).backward()
            if repeat:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--orig", default=None, help="original checkout (default: $DFINE_ORIG_DIR or /work/orig)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--boxes", type=int, default=8, help="targets per image (image i gets boxes + 3 * i)")
    parser.add_argument("--image-size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--model-step", action="store_true", help="also time the original model fwd+bwd")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [args.boxes + 3 * i for i in range(args.batch_size)]
    try:
        orig = find_original(args.orig)
    except FileNotFoundError as error:
        orig = None
        print(f"{error}; timing ours only, on a synthetic output dict")
    criteria: dict[str, Callable] = {}
    if orig is None:
        outputs, targets = synthetic_outputs(sizes), make_targets(sizes, NUM_CLASSES, seed=1)
    else:
        model, theirs = build_original(orig)
        perturb_weights(model, args.image_size)
        outputs, targets = run_model(model, sizes, NUM_CLASSES, args.image_size, seed=1)
        criteria["original"] = theirs
    criteria["ours"] = our_criterion()
    rows = time_criteria(criteria, outputs, targets, args.repeats)
    if orig is not None and args.model_step:
        images = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
        rows["original model fwd+bwd"] = []
        for _ in range(3):
            start = time.perf_counter()
            sum(theirs(model(images, targets), targets).values()).backward()
            rows["original model fwd+bwd"].append(time.perf_counter() - start)
    threads = torch.get_num_threads()
    print(f"criterion forward+backward, batch {args.batch_size}, targets {sizes}, {threads} threads")
    for name, times in rows.items():
        print(
            f"  {name:24s} median {statistics.median(times) * 1e3:8.1f} ms   min {min(times) * 1e3:8.1f} ms"
        )
    if "original" in rows:
        ratio = statistics.median(rows["ours"]) / statistics.median(rows["original"])
        print(f"  ours / original: {ratio:.2f}x time ({1 / ratio:.2f}x throughput)")
    if "original model fwd+bwd" in rows:
        step = statistics.median(rows["original model fwd+bwd"])
        share = statistics.median(rows["original"]) / step
        print(f"  original criterion share of the original model+criterion fwd+bwd: {share:.1%}")


if __name__ == "__main__":
    main()
