"""HungarianMatcher: known assignments, empty targets, cost weights, chunking, equality with the original."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfine.config.registry import LOSSES, ConfigError
from dfine.losses import HungarianMatcher

D_FINE_COSTS = {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}


def random_outputs(batch_size: int, num_queries: int, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centre = torch.rand(batch_size, num_queries, 2, generator=generator)
    size = 0.05 + 0.5 * torch.rand(batch_size, num_queries, 2, generator=generator)
    return {
        "pred_logits": 2 * torch.randn(batch_size, num_queries, num_classes, generator=generator),
        "pred_boxes": torch.cat((centre, size), dim=-1),
    }


def random_targets(sizes: list[int], num_classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=generator),
            "boxes": torch.cat(
                (torch.rand(n, 2, generator=generator), 0.05 + 0.5 * torch.rand(n, 2, generator=generator)), 1
            ),
        }
        for n in sizes
    ]


def box_at(x: float) -> list[float]:
    return [x, 0.5, 0.1, 0.1]


def test_matcher_finds_the_optimal_assignment_where_greedy_matching_fails() -> None:
    # L1 cost only. Both targets are closest to query 0; the optimum gives it to target 1 (cost 0.05 + 0.15
    # for target 0 on query 1 = 0.20, against 0.05 + 0.25 = 0.30 the other way round).
    matcher = HungarianMatcher({"cost_class": 0, "cost_bbox": 1, "cost_giou": 0})
    outputs = {
        "pred_logits": torch.zeros(1, 3, 2),
        "pred_boxes": torch.tensor([[box_at(0.5), box_at(0.3), box_at(0.9)]]),
    }
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([box_at(0.45), box_at(0.55)])}]
    [(queries, target_index)] = matcher(outputs, targets)
    assert queries.tolist() == [0, 1]
    assert target_index.tolist() == [1, 0]


def test_matcher_returns_empty_pairs_for_images_without_targets() -> None:
    matcher = HungarianMatcher(D_FINE_COSTS)
    outputs = random_outputs(3, 10, 4, seed=0)
    targets = random_targets([0, 3, 0], 4, seed=1)
    matches = matcher(outputs, targets)
    assert [len(q) for q, _ in matches] == [0, 3, 0]
    assert matches[0][0].dtype == torch.int64
    assert sorted(matches[1][1].tolist()) == [0, 1, 2]
    none = matcher(outputs, random_targets([0, 0, 0], 4, seed=1))
    assert all(len(q) == 0 and len(t) == 0 for q, t in none)


def test_matcher_cost_weights_change_the_assignment() -> None:
    # query 0 has the target's box but a low score for its class; query 1 the opposite
    outputs = {
        "pred_logits": torch.tensor([[[-4.0, 0.0], [4.0, 0.0]]]),
        "pred_boxes": torch.tensor([[box_at(0.5), box_at(0.1)]]),
    }
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([box_at(0.5)])}]
    by_box = HungarianMatcher({"cost_class": 0, "cost_bbox": 5, "cost_giou": 2})(outputs, targets)
    by_class = HungarianMatcher({"cost_class": 2, "cost_bbox": 0, "cost_giou": 0})(outputs, targets)
    assert by_box[0][0].tolist() == [0]
    assert by_class[0][0].tolist() == [1]


@pytest.mark.parametrize("sizes", [[7, 0, 25], [60, 3]])  # 60 targets > 40 queries: every query is used
def test_chunked_cost_matrix_gives_the_same_matches_as_one_chunk(sizes: list[int]) -> None:
    outputs = random_outputs(len(sizes), 40, 6, seed=2)
    targets = random_targets(sizes, 6, seed=3)
    whole = HungarianMatcher(D_FINE_COSTS)(outputs, targets)
    chunked = HungarianMatcher(D_FINE_COSTS, max_cost_entries=7)(outputs, targets)
    for (q1, t1), (q2, t2), size in zip(whole, chunked, sizes, strict=True):
        assert len(q1) == min(size, 40)
        torch.testing.assert_close(q1, q2)
        torch.testing.assert_close(t1, t2)


def test_matching_several_outputs_at_once_equals_matching_each() -> None:
    matcher = HungarianMatcher(D_FINE_COSTS)
    outputs = [random_outputs(2, 20, 5, seed=s) for s in range(3)]
    targets = random_targets([4, 9], 5, seed=4)
    together = matcher.match_many(outputs, targets)
    for output, matches in zip(outputs, together, strict=True):
        for (q1, t1), (q2, t2) in zip(matcher(output, targets), matches, strict=True):
            assert q1.tolist() == q2.tolist() and t1.tolist() == t2.tolist()


def test_matcher_handles_hundreds_of_targets_degenerate_boxes_and_nan_predictions() -> None:
    matcher = HungarianMatcher(D_FINE_COSTS)
    outputs = random_outputs(1, 300, 3, seed=5)
    outputs["pred_boxes"][0, :5, 2:] = 0.0  # zero-area predictions
    outputs["pred_boxes"][0, 5] = float("nan")
    targets = random_targets([300], 3, seed=6)
    targets[0]["boxes"][:5, 2:] = 0.0  # zero-area targets
    [(queries, target_index)] = matcher(outputs, targets)
    assert sorted(queries.tolist()) == list(range(300))
    assert sorted(target_index.tolist()) == list(range(300))


def test_matcher_softmax_class_cost_prefers_the_most_probable_query() -> None:
    matcher = HungarianMatcher({"cost_class": 1, "cost_bbox": 0, "cost_giou": 0}, use_focal_loss=False)
    outputs = {"pred_logits": torch.tensor([[[0.0, 1.0], [3.0, 0.0]]]), "pred_boxes": torch.rand(1, 2, 4)}
    [(queries, _)] = matcher(outputs, [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}])
    assert queries.tolist() == [1]


def test_matcher_config_errors_name_the_bad_key() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'cost_giou'"):
        HungarianMatcher({"cost_class": 2, "cost_bbox": 5, "cost_gio": 2})
    with pytest.raises(ConfigError, match="missing"):
        HungarianMatcher({"cost_class": 2, "cost_bbox": 5})
    with pytest.raises(ConfigError, match="all three costs are 0"):
        HungarianMatcher({"cost_class": 0, "cost_bbox": 0, "cost_giou": 0})


def test_matcher_builds_from_the_original_config_block() -> None:
    block = {"type": "HungarianMatcher", "weight_dict": D_FINE_COSTS, "alpha": 0.25, "gamma": 2.0}
    matcher = LOSSES.build(block, "criterion.matcher")
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 5.0, 2.0)
    assert matcher.use_focal_loss


@pytest.mark.original
@pytest.mark.parametrize("use_focal_loss", [True, False])
def test_matches_equal_the_original_matcher(original: Path, use_focal_loss: bool) -> None:
    from src.zoo.dfine.matcher import HungarianMatcher as OriginalMatcher

    theirs = OriginalMatcher(D_FINE_COSTS, use_focal_loss=use_focal_loss, alpha=0.25, gamma=2.0)
    ours = HungarianMatcher(D_FINE_COSTS, use_focal_loss=use_focal_loss)
    for seed, sizes in enumerate([[5, 0, 12, 1], [150, 40], [1]]):
        outputs = random_outputs(len(sizes), 100, 10, seed=seed)
        targets = random_targets(sizes, 10, seed=seed + 100)
        for (q1, t1), (q2, t2) in zip(
            theirs(outputs, targets)["indices"], ours(outputs, targets), strict=True
        ):
            assert q1.tolist() == q2.tolist()
            assert t1.tolist() == t2.tolist()
