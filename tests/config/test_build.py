"""The builders hand over exactly what schema.BLOCKS lists, and build every block through its registry."""

from __future__ import annotations

import pytest

from dfine.config.build import build_block
from dfine.config.registry import ConfigError


def test_build_block_builds_through_the_registry_of_the_table_entry() -> None:
    warmup = build_block("lr_warmup_scheduler", {"type": "LinearWarmup", "warmup_duration": 5})
    assert type(warmup).__name__ == "LinearWarmup" and warmup.warmup_duration == 5


def test_a_builder_that_passes_other_values_than_the_table_fails_loudly() -> None:
    with pytest.raises(AssertionError, match=r"model\.decoder passes \['num_classes'\].*eval_spatial_size"):
        build_block("model.decoder", {"type": "DFINETransformer"}, num_classes=3)


def test_nested_keys_are_replaced_by_what_the_builder_made_of_them() -> None:
    matcher = build_block(
        "criterion.matcher",
        {"type": "HungarianMatcher", "weight_dict": {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}},
        use_focal_loss=True,
    )
    block = {
        "type": "DFINECriterion",
        "matcher": {"type": "HungarianMatcher"},
        "weight_dict": {"loss_vfl": 1},
    }
    criterion = build_block("criterion", {**block, "losses": ["vfl"]}, matcher=matcher, num_classes=3)
    assert criterion.matcher is matcher


def test_a_provided_value_inside_the_block_is_rejected_by_the_builder_too() -> None:
    with pytest.raises(ConfigError, match=r"ema\.model: 'model' is set once at the top level"):
        build_block("ema", {"type": "ModelEMA", "model": None}, model=None)
