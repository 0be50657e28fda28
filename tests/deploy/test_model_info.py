"""Parameter and GFLOP counts (dfine.deploy.model_info, tools/model_info.py) vs the original and the paper.

N and S at 640x640 take about 3 s on one thread; the counts do not depend on the weights' values.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import dfine
from dfine.deploy.model_info import count_gflops, count_parameters, flop_breakdown

ROOT = Path(__file__).resolve().parents[2]
# the original D-FINE's counts (sum of numel over model.parameters(), before deploy())
ORIGINAL_PARAMETERS = {"n": 3_782_693, "s": 10_321_877}
# paper figures at 640x640 with a band for rounding and counting details
PAPER_GFLOPS_BAND = {"n": (6.5, 8.0), "s": (23.5, 27.0)}


def build(size: str, side: int = 640) -> nn.Module:
    cfg = dfine.load_config(
        ROOT / f"configs/dfine/dfine_hgnetv2_{size}_coco.yml", [f"eval_spatial_size=[{side}, {side}]"]
    )
    return dfine.build_model(cfg)


@pytest.mark.parametrize("size", ["n", "s"])
def test_n_and_s_parameter_counts_and_gflops_match_the_original_and_the_paper(size: str) -> None:
    torch.manual_seed(0)
    model = build(size)
    assert count_parameters(model) == ORIGINAL_PARAMETERS[size]
    low, high = PAPER_GFLOPS_BAND[size]
    training_form = count_gflops(model)
    assert model.training, "count_gflops must restore the training flag"
    deployed = count_gflops(model.deploy())
    assert low < deployed < high, f"D-FINE-{size.upper()}: {deployed:.2f} GFLOPs at 640x640"
    # deploy() merges the re-parameterised 1x1 branches into their 3x3 convolutions
    assert deployed < training_form < deployed * 1.01


def test_conv_and_linear_flops_count_a_multiply_add_as_two() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 32 * 32, 10))
    conv = 2 * (3 * 3 * 3) * 8 * 32 * 32  # 2 x kernel volume x output values
    linear = 2 * 8 * 32 * 32 * 10
    assert flop_breakdown(model, (32, 32)) == {"aten.convolution": conv, "aten.addmm": linear}
    assert count_gflops(model, (32, 32)) == pytest.approx((conv + linear) / 1e9)


def test_deformable_sampling_is_counted_only_with_extra_ops() -> None:
    model = build("n", 256).deploy()
    plain = flop_breakdown(model, (256, 256))
    extra = flop_breakdown(model, (256, 256), extra_ops=True)
    assert "aten.grid_sampler_2d" not in plain and "aten.mv" not in plain
    # the deployed self-attentions run the fused kernel, counted as their two matrix products: 2 products x
    # 2 FLOPs x 8 heads x 16 channels x (3 decoder layers x 300 x 300 queries + the encoder's 8 x 8 tokens^2)
    fused = plain["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert fused == 4 * 8 * 16 * (3 * 300 * 300 + 64 * 64)
    # the deployed cross-attention sums its weighted samples as a product with a row of ones:
    # 2 FLOPs x 3 layers x 8 heads x 16 channels x 12 points x 300 queries
    assert plain["aten.bmm"] == 2 * 3 * 8 * 16 * 12 * 300
    # 3 decoder layers, 300 queries, 8 heads x 16 channels, 6 + 6 points, 8 FLOPs per sampled value
    assert extra["aten.grid_sampler_2d"] == 3 * 300 * 8 * 16 * 12 * 8
    assert {op: flops for op, flops in extra.items() if op in plain} == plain


def test_image_size_not_a_multiple_of_32_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"multiples of 32.*\(640, 650\)"):
        count_gflops(nn.Conv2d(3, 3, 1), (640, 650))


def test_tool_prints_one_markdown_row_per_size(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("model_info_tool", ROOT / "tools" / "model_info.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--sizes", "n", "--image-size", "256"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "1 MAC = 2 FLOPs" in lines[0] and "256x256" in lines[0]
    assert lines[2].startswith("| D-FINE-N | 3,782,693 (3.8 M) |")
