"""Record the original D-FINE model's outputs so CI can re-check our model's parity without the original code.

The weights are not stored: :func:`dfine.models.realistic_weights.realistic_state_dict` regenerates them
from a seed and the key names, which both code bases share. The fixture stores the original's key list and
shapes, the seed, a checksum of the weights, and the original's eval outputs (float32) and training outputs
(float64, stored as float32) on a seeded 320x320 image.

A recording is only worth keeping if every machine recomputes it to well within the parity test's atol
(:data:`ATOL`); the tool refuses (exit status 1, nothing written) one that fails either check:

* **Top-k margin.** The decoder's queries are the Q best-scoring encoder cells, in score order. Two scores
  closer than the rounding differences between machines can swap two queries (or the Q-th and the (Q+1)-th
  cell), which changes whole rows of every output by O(1). :data:`MIN_TOPK_MARGIN` is the smallest gap
  allowed between neighbouring scores among the best Q + 1.
* **Conditioning.** Outputs must move by less than ``ATOL / 10`` when the image moves by a few rounding
  errors (:data:`PERTURBATION_EPS`), a stand-in for another machine's kernels. Training-mode BatchNorm on one
  image fails this in float32: relative rounding differences of ~3e-7 (AVX2 vs AVX-512 oneDNN kernels) grow
  to ~1e-4 in the encoder scores and ~4e-4 in the outputs, so the training half is recorded in float64.

Usage (with the original repository checked out, e.g. ``git clone https://github.com/Peterande/D-FINE``)::

    DFINE_ORIG_DIR=../D-FINE python tools/make_model_fixture.py --size n
    # writes tests/fixtures/model_parity_n.pt (~0.4 MB); tests/models/test_model_parity.py reads it
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from dfine.models.realistic_weights import random_images, realistic_state_dict, state_dict_checksum

# Seeds 0..1199 were scanned for the float32 eval run's top-k margin: 259 has 2.9e-5 (the median seed 1.7e-6).
SEED = 259
IMAGE_SIZE = (320, 320)
TRAIN_DTYPE = torch.float64
EVAL_KEYS = ("pred_logits", "pred_boxes")
TRAIN_KEYS = ("pred_logits", "pred_boxes", "pred_corners", "ref_points")
ATOL = 1e-4  # the absolute tolerance of tests/models/test_model_parity.py
# float32: encoder scores (~3) differed by up to 4.3e-6 between oneDNN/ATen ISAs (SSE4.1, AVX2, AVX-512) and
# 1 or 2 threads, so a gap can shrink by 2 x 4.3e-6 = 8.6e-6 between two machines; 2e-5 leaves 2x headroom.
# float64: rounding is 5e8 times finer; training-mode outputs differed by 6e-14 between AVX2 and AVX-512, so
# 1e-9 keeps a headroom of over 1e4 while almost any seed passes (their smallest gaps are ~1e-6).
MIN_TOPK_MARGIN = {torch.float32: 2e-5, torch.float64: 1e-9}
PERTURBATION_EPS = 8  # relative image noise, in units of the dtype's eps (float32: 1e-6)


def build_original(orig_dir: Path, size: str, num_denoising: int) -> torch.nn.Module:
    sys.path.insert(0, str(orig_dir))
    from src.core import YAMLConfig  # the original's config system

    cfg = YAMLConfig(
        str(orig_dir / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml"),
        HGNetv2={"pretrained": False},
        DFINETransformer={"num_denoising": num_denoising},
        eval_spatial_size=list(IMAGE_SIZE),
    )
    return cfg.model


def topk_margin(scores: Tensor, num_queries: int) -> float:
    """Smallest gap between neighbouring scores among each image's ``num_queries + 1`` best cells.

    Args:
        scores: [B, S] encoder cell scores (each cell's best class logit), S >= num_queries.
        num_queries: Q, the cells the decoder keeps; the gap between ranks Q - 1 and Q decides the set, the
            others its order.

    Returns:
        The smallest ``score[r] - score[r + 1]`` over images and ranks r < Q (descending order).
    """
    top = scores.topk(min(num_queries + 1, scores.shape[-1]), dim=-1).values  # [B, Q + 1], descending
    return float((top[:, :-1] - top[:, 1:]).min())


def check_recording(
    name: str,
    outputs: dict[str, Tensor],
    perturbed: dict[str, Tensor],
    scores: Tensor,
    num_queries: int,
) -> float:
    """Raise ``ValueError`` when a recording would not reproduce on other machines (see the module docstring).

    Args:
        name: "eval" or "train", for the message.
        outputs: the recorded outputs, e.g. ``pred_logits`` [B, Q, C].
        perturbed: the same outputs for the image times ``1 + PERTURBATION_EPS * eps * noise``.
        scores: [B, S] encoder cell scores of the recorded run (its dtype picks the margin).
        num_queries: Q.

    Returns:
        The top-k margin (:func:`topk_margin`).
    """
    margin = topk_margin(scores, num_queries)
    limit = MIN_TOPK_MARGIN[scores.dtype]
    if margin < limit:
        raise ValueError(
            f"{name}: two of the {num_queries + 1} best encoder scores are {margin:.1e} apart "
            f"(< {limit:.0e}), so another machine's rounding can swap queries; pass another --seed"
        )
    drift = max(float((perturbed[key] - value).abs().max()) for key, value in outputs.items())
    if drift > ATOL / 10:
        raise ValueError(
            f"{name}: the outputs move by {drift:.1e} (> {ATOL / 10:.0e}) when the image moves by "
            f"{PERTURBATION_EPS} rounding errors, so other machines will not reproduce them to {ATOL:.0e}; "
            "record this half in float64"
        )
    return margin


def run_recorded(
    model: torch.nn.Module, images: Tensor, targets: list[dict] | None
) -> tuple[dict[str, Tensor], Tensor]:
    """One forward pass without gradients: (recorded outputs, encoder scores [B, S])."""
    scores: list[Tensor] = []
    hook = model.decoder.enc_score_head.register_forward_hook(
        lambda module, inputs, logits: scores.append(logits.detach().max(-1).values)
    )
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            outputs = model(images, targets) if model.training else model(images)
    finally:
        hook.remove()
    keys = TRAIN_KEYS if model.training else EVAL_KEYS
    return {key: outputs[key].detach().clone() for key in keys}, scores[0]


def record(model: torch.nn.Module, images: Tensor, targets: list[dict] | None) -> tuple[dict, float]:
    """Outputs of ``model`` in its current mode, checked by :func:`check_recording`: (outputs, margin)."""
    outputs, scores = run_recorded(model, images, targets)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0), dtype=images.dtype)
    relative = PERTURBATION_EPS * torch.finfo(images.dtype).eps
    perturbed, _ = run_recorded(model, images * (1 + relative * noise), targets)
    name = "train" if model.training else "eval"
    return outputs, check_recording(name, outputs, perturbed, scores, model.decoder.num_queries)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="n", choices=["n", "s", "m", "l", "x"])
    parser.add_argument("--orig", default=os.environ.get("DFINE_ORIG_DIR", "../orig"))
    parser.add_argument("--seed", type=int, default=SEED, help="weights and image seed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    orig_dir = Path(args.orig).resolve()
    if not (orig_dir / "src" / "zoo" / "dfine").is_dir():
        sys.exit(f"no original D-FINE checkout at {orig_dir}: pass --orig or set DFINE_ORIG_DIR")
    out = Path(
        args.out or Path(__file__).resolve().parents[1] / f"tests/fixtures/model_parity_{args.size}.pt"
    )

    model = build_original(orig_dir, args.size, num_denoising=0)
    weights = realistic_state_dict(model, args.seed)
    model.load_state_dict(weights, strict=True)
    state = model.state_dict()
    images = random_images(1, *IMAGE_SIZE, seed=args.seed)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    try:
        eval_out, eval_margin = record(model.eval(), images, None)
        train_out, train_margin = record(model.to(TRAIN_DTYPE).train(), images.to(TRAIN_DTYPE), targets)
    except ValueError as error:
        sys.exit(f"not writing {out}: {error}")
    fixture = {
        "size": args.size,
        "seed": args.seed,
        "image_size": list(IMAGE_SIZE),
        "keys": list(state),
        "shapes": [list(v.shape) for v in state.values()],
        "checksum": state_dict_checksum(weights),
        "eval": eval_out,
        "train_dtype": str(TRAIN_DTYPE).removeprefix("torch."),
        "train": {key: value.float() for key, value in train_out.items()},  # float32 halves the file
        "topk_margin": {"eval": eval_margin, "train": train_margin},
    }
    torch.save(fixture, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); top-k margins {fixture['topk_margin']}")


if __name__ == "__main__":
    main()
