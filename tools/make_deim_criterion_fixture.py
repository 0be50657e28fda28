"""Record DEIM's criterion (MAL and the D-FINE terms it keeps) on recorded model outputs, so CI re-checks our
``DEIMCriterion`` without the DEIM checkout.

DEIM trains the D-FINE architecture unchanged, so the output dicts recorded from the original D-FINE N model
in ``tests/fixtures/criterion_parity.pt`` (see tools/make_criterion_fixture.py) are exactly what DEIM's
criterion sees. This script scores batch ``boxes`` of that fixture with DEIM's own ``DEIMCriterion``
(DEIM's loss weights, ``losses: [mal, boxes, local]``, ``gamma: 1.5``) in four cases and stores only the
settings and terms:

* ``regular``: without the denoising entries;
* ``denoising``: with ``dn_outputs``/``dn_pre_outputs``/``dn_meta``;
* ``mal_alpha``: denoising, ``mal_alpha: 0.5``;
* ``own_matches``: denoising, ``use_uni_set: false`` and ``losses: [mal, boxes]`` (DEIM reuses the final
  layer's FGL targets for every layer's own pairs when the union is off, so ``local`` is left out there).

Usage (with DEIM checked out, e.g. ``git clone https://github.com/Intellindust-AI-Lab/DEIM``)::

    DEIM_DIR=../DEIM python tools/make_deim_criterion_fixture.py
    # writes tests/fixtures/deim_criterion_parity.pt (a few kB); tests/losses/test_deim_criterion.py reads it
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# the fixture format of criterion_parity.pt (tools/ is on sys.path when this runs as a script)
from make_criterion_fixture import unpack_outputs
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS_FIXTURE = ROOT / "tests" / "fixtures" / "criterion_parity.pt"
DEIM_WEIGHTS = {"loss_mal": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_fgl": 0.15, "loss_ddf": 1.5}
MATCHER = {
    "weight_dict": {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0},
    "use_focal_loss": True,
    "alpha": 0.25,
    "gamma": 2.0,
}
# case: (criterion settings on top of DEIM's, whether the denoising entries are kept)
CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "regular": ({}, False),
    "denoising": ({}, True),
    "mal_alpha": ({"mal_alpha": 0.5}, True),
    "own_matches": (
        {"use_uni_set": False, "losses": ["mal", "boxes"], "weight_dict": {"loss_mal": 1.0, "loss_bbox": 5.0,
                                                                           "loss_giou": 2.0}},
        True,
    ),
}  # fmt: skip


def find_deim(path: str | None = None) -> Path:
    """The DEIM checkout (``path``, env ``DEIM_DIR`` or /work/deim), put on ``sys.path``."""
    deim = Path(path or os.environ.get("DEIM_DIR", "/work/deim")).expanduser().resolve()
    if not (deim / "engine" / "deim" / "deim_criterion.py").is_file():
        raise FileNotFoundError(f"no DEIM checkout at {deim}: pass --deim or set DEIM_DIR")
    if str(deim) not in sys.path:
        sys.path.insert(0, str(deim))
    return deim


def deim_settings(case: str, num_classes: int) -> dict[str, Any]:
    """Our ``DEIMCriterion`` arguments for ``case`` (the matcher block nested)."""
    settings: dict[str, Any] = {
        "weight_dict": dict(DEIM_WEIGHTS),
        "losses": ["mal", "boxes", "local"],
        "alpha": 0.75,
        "gamma": 1.5,
        "num_classes": num_classes,
        "reg_max": 32,
        "matcher": dict(MATCHER),
    }
    settings.update(CASES[case][0])
    return settings


def build_deim_criterion(settings: Mapping[str, Any]) -> nn.Module:
    """DEIM's own criterion and matcher from ``settings``."""
    from engine.deim.deim_criterion import DEIMCriterion
    from engine.deim.matcher import HungarianMatcher

    settings = dict(settings)
    matcher = HungarianMatcher(**settings.pop("matcher"))
    return DEIMCriterion(matcher, **settings)


def deim_terms(case: str, batch: Mapping[str, Any], num_classes: int) -> dict[str, Tensor]:
    criterion = build_deim_criterion(deim_settings(case, num_classes))
    outputs = unpack_outputs(batch["outputs"], keep_denoising=CASES[case][1])
    losses = criterion(outputs, batch["targets"])
    return {k: v.detach().clone() for k, v in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deim", default=None, help="DEIM checkout (default: $DEIM_DIR or /work/deim)")
    parser.add_argument("--out", default=str(ROOT / "tests/fixtures/deim_criterion_parity.pt"))
    args = parser.parse_args()
    deim = find_deim(args.deim)
    recorded = torch.load(OUTPUTS_FIXTURE, weights_only=True)
    num_classes = int(recorded["settings"]["num_classes"])
    batch = recorded["batches"]["boxes"]
    losses = {case: deim_terms(case, batch, num_classes) for case in CASES}
    commit = subprocess.run(["git", "-C", str(deim), "rev-parse", "HEAD"], capture_output=True, text=True)
    fixture = {
        "source": f"DEIM {commit.stdout.strip() or '(unknown commit)'}, make_deim_criterion_fixture.py "
        "on batch 'boxes' of criterion_parity.pt",
        "settings": {case: deim_settings(case, num_classes) for case in CASES},
        "keep_denoising": {case: CASES[case][1] for case in CASES},
        "losses": losses,
    }
    torch.save(fixture, args.out)
    size = Path(args.out).stat().st_size
    counts = ", ".join(f"{name}: {len(terms)} terms" for name, terms in losses.items())
    print(f"wrote {args.out} ({size / 1e3:.1f} kB): {counts}")


if __name__ == "__main__":
    main()
