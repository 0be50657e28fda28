"""DEIMCriterion: MAL and every DEIM term against DEIM's own criterion (recorded fixture for CI, live with
``DEIM_DIR``), MAL's formula on a hand-made case, and the config surface."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import make_deim_criterion_fixture
import pytest
import torch
from torch import Tensor

from dfine.config.registry import ConfigError
from dfine.losses import DEIMCriterion, HungarianMatcher
from dfine.losses.loss_terms import matchability_aware_loss

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "deim_criterion_parity.pt"
OUTPUTS = ROOT / "tests" / "fixtures" / "criterion_parity.pt"
# D-FINE returns a zero DDF for the last denoising layer (its own teacher); DEIM leaves the key out
ZERO_ONLY_OURS = {"loss_ddf_dn_2"}


def ours(settings: Mapping[str, Any]) -> DEIMCriterion:
    settings = dict(settings)
    return DEIMCriterion(HungarianMatcher(**settings.pop("matcher")), **settings)


def assert_deim_terms(mine: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> None:
    extra = set(mine) - set(theirs)
    assert extra <= ZERO_ONLY_OURS and set(theirs) <= set(mine), (extra, set(theirs) - set(mine))
    for key in extra:
        assert mine[key].item() == 0.0
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key].detach(), value, rtol=1e-4, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def batch() -> dict[str, Any]:
    return torch.load(OUTPUTS, weights_only=True)["batches"]["boxes"]


@pytest.mark.parametrize("case", ["regular", "denoising", "mal_alpha", "own_matches"])
def test_terms_equal_the_recorded_deim_terms(
    recorded: dict[str, Any], batch: dict[str, Any], case: str
) -> None:
    outputs = make_deim_criterion_fixture.unpack_outputs(batch["outputs"], recorded["keep_denoising"][case])
    losses = ours(recorded["settings"][case])(outputs, batch["targets"])
    assert_deim_terms(losses, recorded["losses"][case])
    assert "loss_mal" in losses and "loss_vfl" not in losses
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_mal_alpha_and_the_union_switch_change_the_terms_they_should(recorded: dict[str, Any]) -> None:
    terms = recorded["losses"]
    # mal_alpha scales only the negatives of the class term; box terms are untouched
    assert terms["mal_alpha"]["loss_mal"] < terms["denoising"]["loss_mal"]
    assert terms["mal_alpha"]["loss_bbox"] == terms["denoising"]["loss_bbox"]
    # without the union, boxes follow each layer's own match (a different set than the union)
    assert not torch.equal(terms["own_matches"]["loss_bbox_aux_0"], terms["denoising"]["loss_bbox_aux_0"])


def test_mal_formula_on_one_positive_and_one_negative() -> None:
    # B=1, Q=2, C=1: query 0 matched with IoU 0.64, query 1 a negative
    logits = torch.tensor([[[0.3], [-1.0]]])
    gamma = 1.5
    loss = matchability_aware_loss(
        logits, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0.64]), 1.0, gamma
    )
    target = 0.64**gamma
    p0, p1 = torch.sigmoid(torch.tensor(0.3)).item(), torch.sigmoid(torch.tensor(-1.0)).item()
    positive = -(target * math.log(p0) + (1 - target) * math.log(1 - p0))  # weight 1
    negative = -(p1**gamma) * math.log(1 - p1)  # focal weight, target 0
    # mean over Q times Q, summed, over num_boxes = 1: the plain sum
    assert loss.item() == pytest.approx(positive + negative, rel=1e-6)
    with_alpha = matchability_aware_loss(
        logits, torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0.64]), 1.0, gamma, 0.5
    )
    assert with_alpha.item() == pytest.approx(positive + 0.5 * negative, rel=1e-6)


def test_mal_needs_a_weight_and_unknown_losses_are_named() -> None:
    matcher = HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_giou": 2})
    with pytest.raises(ConfigError, match="loss_mal"):
        DEIMCriterion(matcher, {"loss_vfl": 1}, ["mal"])
    with pytest.raises(ConfigError, match="Did you mean 'mal'"):
        DEIMCriterion(matcher, {"loss_mal": 1}, ["mall"])


# ---------------------------------------------------------------------------------------- live DEIM
@pytest.mark.deim
@pytest.mark.parametrize("case", ["regular", "denoising", "mal_alpha", "own_matches"])
def test_terms_equal_deims_own_criterion_live(deim: Path, batch: dict[str, Any], case: str) -> None:
    helpers = make_deim_criterion_fixture
    num_classes = 8
    theirs = helpers.deim_terms(case, batch, num_classes)
    outputs = helpers.unpack_outputs(batch["outputs"], helpers.CASES[case][1])
    assert_deim_terms(ours(helpers.deim_settings(case, num_classes))(outputs, batch["targets"]), theirs)
