"""Time to accuracy: D-FINE-N from scratch on the built-in dataset with the D-FINE recipe and the DEIM recipe.

Both runs use the same model, data, batch, seed and epoch budget (``configs/quickstart.yml`` and
``configs/quickstart_deim.yml``); only the recipe differs. Prints val AP per epoch side by side, the wall time
of each run, and the first epoch at which DEIM reaches D-FINE's final AP.

For a budget other than the quickstart's 5 epochs the stage epochs move with it, placed as both upstreams
place them: D-FINE's stage 2 (and its lr drop) is the last epoch; DEIM's Mosaic/MixUp and flat lr run to the
middle of the run and its last epoch is the no-aug stage (``policy.epoch: [0, E // 2, E - 1]``).

Usage::

    python tools/benchmark_recipes.py                      # 5 epochs, both runs one after the other
    python tools/benchmark_recipes.py --epochs 10 --parallel --out output/recipes_10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"dfine": "configs/quickstart.yml", "deim": "configs/quickstart_deim.yml"}


def overrides(recipe: str, epochs: int) -> list[str]:
    """``-u`` values placing each recipe's stages in an ``epochs`` budget."""
    last, middle = epochs - 1, max(1, epochs // 2)
    common = [f"epochs={epochs}", f"train_dataloader.collate_fn.stop_epoch={last}"]
    if recipe == "dfine":
        return [
            *common,
            f"train_dataloader.dataset.transforms.policy.epoch={last}",
            f"lr_scheduler.milestones=[{last}]",
        ]
    return [
        *common,
        f"train_dataloader.dataset.transforms.policy.epoch=[0, {middle}, {last}]",
        f"train_dataloader.collate_fn.mixup_epochs=[0, {middle}]",
        f"lr_scheduler.flat_epochs={middle}",
        "lr_scheduler.no_aug_epochs=1",
    ]


def launch(recipe: str, epochs: int, seed: int, out: Path, threads: int) -> tuple[subprocess.Popen, float]:
    run_dir = out / recipe
    command = [
        sys.executable, "-m", "dfine.cli.train", "-c", RECIPES[recipe], "-d", "cpu", "--seed", str(seed),
        "--output-dir", str(run_dir), "-u", *overrides(recipe, epochs),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    run_dir.mkdir(parents=True, exist_ok=True)
    log = (run_dir / "train.log").open("w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, time.perf_counter()


def ap_curve(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [float(json.loads(line).get("val_AP", float("nan"))) for line in lines if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="output/benchmark_recipes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--parallel", action="store_true", help="run both recipes at once (same CPU share)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    wall: dict[str, float] = {}
    if args.parallel:
        running = {recipe: launch(recipe, args.epochs, args.seed, out, args.threads) for recipe in RECIPES}
        while running:  # each run's own finish time, whichever ends first
            for recipe, (process, start) in list(running.items()):
                if process.poll() is not None:
                    wall[recipe] = time.perf_counter() - start
                    del running[recipe]
            time.sleep(1.0)
    else:
        for recipe in RECIPES:
            process, start = launch(recipe, args.epochs, args.seed, out, args.threads)
            process.wait()
            wall[recipe] = time.perf_counter() - start
    curves = {recipe: ap_curve(out / recipe) for recipe in RECIPES}
    print(f"D-FINE-N from scratch, {args.epochs} epochs, seed {args.seed}, quickstart data and batch")
    print(f"{'epoch':>5}  {'D-FINE AP':>9}  {'DEIM AP':>9}")
    for epoch in range(max(len(c) for c in curves.values())):
        row = [c[epoch] if epoch < len(c) else float("nan") for c in curves.values()]
        print(f"{epoch:>5}  {row[0]:>9.4f}  {row[1]:>9.4f}")
    print(f"wall time: D-FINE {wall['dfine']:.0f} s, DEIM {wall['deim']:.0f} s "
          f"({'in parallel' if args.parallel else 'one after the other'})")  # fmt: skip
    target = curves["dfine"][-1] if curves["dfine"] else float("nan")
    reached = next((e for e, ap in enumerate(curves["deim"]) if ap >= target), None)
    if reached is None:
        print(f"DEIM does not reach D-FINE's final AP {target:.4f} within {args.epochs} epochs")
    else:
        share = (reached + 1) / args.epochs
        print(f"DEIM reaches D-FINE's final AP {target:.4f} at epoch {reached} ({share:.0%} of the epochs)")


if __name__ == "__main__":
    main()
