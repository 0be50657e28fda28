"""HGNetv2 backbone and HybridEncoder: layout and outputs against the original D-FINE, deploy form, freezing.

Tests marked ``original`` need the original checkout (fixture ``original``) and skip without it; the rest run
in CI. "Realistic" weights: every parameter gets seeded noise (std 0.02) and BatchNorms get running statistics
from train-mode passes, so fused and unfused forms and both implementations meet non-trivial values.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dfine.config.registry import MODELS
from dfine.models.backbone_deploy import ConcatConv, MaxOf2x2
from dfine.models.common import FrozenBatchNorm2d, get_activation
from dfine.models.hgnetv2 import ConvBNAct, HGNetv2
from dfine.models.hybrid_encoder import HybridEncoder, sincos_position_embedding

VARIANTS = ["B0", "B1", "B2", "B3", "B4", "B5", "B6"]
IMAGE_HEIGHT, IMAGE_WIDTH = 128, 96  # non-square on purpose; parity with the original
SMALL = {"height": 64, "width": 96}  # CI tests: still non-square, stride-32 map 2 x 3

# Backbone and encoder arguments of the five D-FINE sizes, from the original's
# configs/dfine/dfine_hgnetv2_*_coco.yml on top of configs/dfine/include/dfine_hgnetv2.yml.
BACKBONES = {
    "n": dict(name="B0", return_idx=[2, 3], freeze_at=-1, freeze_norm=False, use_lab=True),
    "s": dict(name="B0", return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False, use_lab=True),
    "m": dict(name="B2", return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False, use_lab=True),
    "l": dict(name="B4", return_idx=[1, 2, 3], freeze_stem_only=True, freeze_at=0, freeze_norm=True),
    "x": dict(name="B5", return_idx=[1, 2, 3], freeze_stem_only=True, freeze_at=0, freeze_norm=True),
}
ENCODERS = {
    "n": dict(
        in_channels=[512, 1024],
        feat_strides=[16, 32],
        hidden_dim=128,
        use_encoder_idx=[1],
        dim_feedforward=512,
        expansion=0.34,
        depth_mult=0.5,
    ),
    "s": dict(in_channels=[256, 512, 1024], hidden_dim=256, depth_mult=0.34, expansion=0.5),
    "m": dict(in_channels=[384, 768, 1536], hidden_dim=256, depth_mult=0.67),
    "l": dict(),
    "x": dict(hidden_dim=384, dim_feedforward=2048),
}
# Measured with the original implementation (YAMLConfig(configs/dfine/dfine_hgnetv2_<size>_coco.yml,
# HGNetv2={'pretrained': False}).model, one size per process): sum of numel over backbone.parameters() and
# encoder.parameters(), and over backbone.state_dict() (buffers included; L and X have frozen norms, whose
# statistics and affine values are buffers) and encoder.state_dict().
ORIGINAL_COUNTS = {
    # size: (backbone parameters, encoder parameters, backbone state numel, encoder state numel)
    "n": (1_850_396, 703_824, 1_862_710, 707_853),
    "s": (1_850_396, 4_021_504, 1_862_710, 4_037_433),
    "m": (6_026_626, 7_799_040, 6_053_382, 7_824_201),
    "l": (13_507_680, 9_343_232, 13_599_072, 9_372_505),
    "x": (33_231_840, 20_700_032, 33_419_680, 20_743_897),
}


def make_realistic(module: nn.Module, batches: Sequence, seed: int = 0) -> nn.Module:
    """Add N(0, 0.02) noise to every parameter, give BatchNorms the mean statistics of ``batches``; eval."""
    generator = torch.Generator().manual_seed(seed)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the calibration batches
        module.train()
        for batch in batches:
            module(batch)
        for norm in norms:
            norm.momentum = 0.1
    return module.eval()


def images(seed: int, batch_size: int = 2, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH) -> Tensor:
    return torch.rand(batch_size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def features(
    encoder_args: dict, seed: int, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH
) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    channels = encoder_args.get("in_channels", [512, 1024, 2048])
    strides = encoder_args.get("feat_strides", [8, 16, 32])
    return [
        torch.randn(2, c, -(-height // s), -(-width // s), generator=generator)
        for c, s in zip(channels, strides, strict=True)
    ]


def realistic_backbone(
    size: str, height: int = IMAGE_HEIGHT, width: int = IMAGE_WIDTH, **overrides
) -> HGNetv2:
    """Our backbone for ``size`` with realistic weights (calibrated unfrozen, loaded into the real args)."""
    args = {**BACKBONES[size], **overrides}
    batches = [images(1, height=height, width=width), images(2, height=height, width=width)]
    calibrated = make_realistic(HGNetv2(**{**args, "freeze_norm": False}), batches)
    backbone = HGNetv2(**args)
    backbone.load_state_dict(calibrated.state_dict(), strict=True)
    return backbone.eval()


def realistic_encoder(size: str, **overrides: object) -> HybridEncoder:
    args = {**ENCODERS[size], **overrides}
    return make_realistic(HybridEncoder(**args), [features(args, 1), features(args, 2)])


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def assert_all_close(actual: Sequence[Tensor], expected: Sequence[Tensor], atol: float) -> float:
    """Element-wise |actual - expected| <= atol for every pair; returns the largest difference."""
    assert len(actual) == len(expected), f"{len(actual)} outputs vs {len(expected)}"
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)
    return max(float((a - e).abs().max()) for a, e in zip(actual, expected, strict=True))


# ------------------------------------------------------------------------------------- against the original


@pytest.mark.original
@pytest.mark.parametrize("freeze_norm", [True, False])
@pytest.mark.parametrize("use_lab", [True, False])
@pytest.mark.parametrize("name", VARIANTS)
def test_backbone_keys_and_shapes_equal_the_original(
    original: Path, name: str, use_lab: bool, freeze_norm: bool
):
    from src.nn.backbone.hgnetv2 import HGNetv2 as OriginalHGNetv2

    with torch.device("meta"):
        theirs = OriginalHGNetv2(name, use_lab=use_lab, freeze_norm=freeze_norm, pretrained=False)
        ours = HGNetv2(name, use_lab=use_lab, freeze_norm=freeze_norm)
    assert list(shapes(ours).items()) == list(shapes(theirs).items())


@pytest.mark.original
@pytest.mark.parametrize("size", list(ENCODERS))
def test_encoder_keys_and_shapes_equal_the_original(original: Path, size: str):
    from src.zoo.dfine.hybrid_encoder import HybridEncoder as OriginalHybridEncoder

    with torch.device("meta"):
        theirs = OriginalHybridEncoder(**ENCODERS[size], eval_spatial_size=[640, 640])
        ours = HybridEncoder(**ENCODERS[size], eval_spatial_size=[640, 640])
    assert list(shapes(ours).items()) == list(shapes(theirs).items())


@pytest.mark.original
# B0 with lab (two return_idx settings), B2 with lab, B4 with frozen norms
@pytest.mark.parametrize("size", ["n", "s", "m", "l"])
def test_backbone_outputs_equal_the_original(original: Path, size: str):
    from src.nn.backbone.hgnetv2 import HGNetv2 as OriginalHGNetv2

    ours = realistic_backbone(size)
    theirs = OriginalHGNetv2(**BACKBONES[size], pretrained=False)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()
    with torch.no_grad():
        difference = assert_all_close(ours(images(3)), theirs(images(3)), atol=1e-5)
    print(f"backbone {size}: max abs difference {difference:.3g}")


@pytest.mark.original
@pytest.mark.parametrize("eval_spatial_size", [None, [IMAGE_HEIGHT, IMAGE_WIDTH]])
@pytest.mark.parametrize("size", ["n", "s"])
def test_encoder_outputs_equal_the_original(original: Path, size: str, eval_spatial_size: list[int] | None):
    from src.zoo.dfine.hybrid_encoder import HybridEncoder as OriginalHybridEncoder

    ours = realistic_encoder(size, eval_spatial_size=eval_spatial_size)
    theirs = OriginalHybridEncoder(**ENCODERS[size], eval_spatial_size=eval_spatial_size)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    inputs = features(ENCODERS[size], seed=3)
    with torch.no_grad():
        difference = assert_all_close(ours(inputs), theirs.eval()(inputs), atol=1e-5)
        # train mode: batch statistics and the position embedding computed on the fly
        train_difference = assert_all_close(ours.train()(inputs), theirs.train()(inputs), atol=1e-5)
    print(
        f"encoder {size} {eval_spatial_size}: max abs difference {difference:.3g}, "
        f"train {train_difference:.3g}"
    )


@pytest.mark.original
def test_position_embedding_equals_the_original_for_a_non_square_map(original: Path):
    from src.zoo.dfine.hybrid_encoder import HybridEncoder as OriginalHybridEncoder

    theirs = OriginalHybridEncoder.build_2d_sincos_position_embedding(5, 3, 64, 10000)  # width 5, height 3
    torch.testing.assert_close(sincos_position_embedding(3, 5, 64, 10000), theirs, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- CI tests


@pytest.mark.parametrize("size", list(BACKBONES))
def test_parameter_counts_equal_the_original_for_every_size(size: str):
    with torch.device("meta"):
        backbone = HGNetv2(**BACKBONES[size])
        encoder = HybridEncoder(**ENCODERS[size], eval_spatial_size=[640, 640])

    def count(tensors: Callable) -> int:
        return sum(t.numel() for t in tensors())

    measured = (
        count(backbone.parameters),
        count(encoder.parameters),
        count(lambda: backbone.state_dict().values()),
        count(lambda: encoder.state_dict().values()),
    )
    assert measured == ORIGINAL_COUNTS[size]


def test_components_are_registered_and_report_what_the_encoder_needs():
    assert MODELS.get("HGNetv2") is HGNetv2
    assert MODELS.get("HybridEncoder") is HybridEncoder
    with torch.device("meta"):
        backbone = HGNetv2("B0", return_idx=[2, 3])
    assert backbone.out_channels == ENCODERS["n"]["in_channels"]
    assert backbone.out_strides == ENCODERS["n"]["feat_strides"]


def test_outputs_have_the_expected_shapes_and_strides_for_a_non_square_input():
    backbone = HGNetv2("B0", use_lab=True, return_idx=[1, 2, 3], freeze_at=-1, freeze_norm=False).eval()
    encoder = HybridEncoder(**ENCODERS["s"]).eval()
    with torch.no_grad():
        for height, width in [(IMAGE_HEIGHT, IMAGE_WIDTH), (100, 70)]:  # the second is no multiple of 32
            maps = backbone(images(0, batch_size=1, height=height, width=width))
            expected = [(1, c, -(-height // s), -(-width // s)) for c, s in [(256, 8), (512, 16), (1024, 32)]]
            assert [tuple(m.shape) for m in maps] == expected
            fused = encoder(maps)
            assert [tuple(m.shape) for m in fused] == [(1, 256, *shape[2:]) for shape in expected]
    assert backbone.out_channels == [256, 512, 1024] and backbone.out_strides == [8, 16, 32]


def test_deployed_backbone_matches_the_eval_outputs():
    backbone = realistic_backbone("s", **SMALL, freeze_norm=True)
    deployed = copy.deepcopy(backbone)
    deployed.convert_to_deploy()
    deployed.convert_to_deploy()  # a second call must be harmless
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in deployed.modules())
    # equal outputs alone would also pass with the stem left as it was
    assert isinstance(deployed.stem.pool, MaxOf2x2) and isinstance(deployed.stem.merge, ConcatConv)
    deployed64 = copy.deepcopy(backbone).double()
    deployed64.convert_to_deploy()
    with torch.no_grad():
        # float64: the folding algebra itself is exact up to rounding
        exact = assert_all_close(
            deployed64(images(3, **SMALL).double()),
            copy.deepcopy(backbone).double()(images(3, **SMALL).double()),
            atol=1e-9,
        )
        # float32: within 1e-4 of the output range; float32 rounding over ~60 layers alone (unfused fp32 vs
        # fp64) already reaches ~1e-5 of it, so a plain 1e-4 absolute bound would test rounding luck
        reference = backbone(images(3, **SMALL))
        scale = max(float(r.abs().max()) for r in reference)
        assert_all_close(deployed(images(3, **SMALL)), reference, atol=1e-4 * scale)
    assert exact < 1e-9


@pytest.mark.parametrize("scale", [-0.7, 0.0, 1.3])
def test_deployed_conv_folds_the_affine_block_for_either_sign_of_its_scale(scale: float):
    # s * relu(y) + b becomes one clamp of the conv's output at b: from below for s >= 0, from above for s < 0
    block = ConvBNAct(4, 6, 3, use_lab=True).eval()
    with torch.no_grad():
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 1.5)
        block.lab.scale.fill_(scale)
        block.lab.bias.fill_(-0.25)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
    block.double()
    with torch.no_grad():
        expected = block(x)
        block.convert_to_deploy()
        got = block(x)
    assert isinstance(block.lab, nn.Identity) and not isinstance(block.act, nn.ReLU)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # both sides of the clamp are met: ReLU's zeros land exactly on b, the rest elsewhere (except for s = 0)
    assert bool((expected == -0.25).any())
    assert bool((expected != -0.25).any()) == (scale != 0.0)


def test_shifted_max_equals_the_max_pool_it_replaces_in_both_layouts():
    x = torch.randn(2, 5, 8, 11)  # negative values too: the stem pools a right/bottom zero-padded map
    expected = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)(x)
    assert torch.equal(MaxOf2x2()(x), expected)
    assert torch.equal(MaxOf2x2()(x.contiguous(memory_format=torch.channels_last)), expected)


@pytest.mark.parametrize("eval_spatial_size", [None, [IMAGE_HEIGHT, IMAGE_WIDTH]])
def test_deployed_encoder_matches_the_eval_outputs(eval_spatial_size: list[int] | None):
    encoder = realistic_encoder("n", eval_spatial_size=eval_spatial_size)
    inputs = features(ENCODERS["n"], seed=3)
    with torch.no_grad():
        reference = encoder(inputs)
        encoder.convert_to_deploy()
        encoder.convert_to_deploy()
        assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
        assert_all_close(encoder(inputs), reference, atol=1e-4)


def test_position_embedding_pairs_tokens_with_coordinates_as_the_original_does():
    # dim 4: one frequency (1.0); token t of a row-major 2 x 3 map gets (t // H, t % H) = (t // 2, t % 2)
    tokens = torch.arange(6.0)
    first, second = tokens // 2, tokens % 2
    expected = torch.stack([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)[None]
    torch.testing.assert_close(sincos_position_embedding(2, 3, 4), expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(2, 3, 6)


def test_position_embedding_is_cached_for_the_eval_size_and_computed_for_other_sizes():
    tiny = dict(in_channels=[16, 32], feat_strides=[16, 32], hidden_dim=32, nhead=4, dim_feedforward=64)
    tiny |= dict(use_encoder_idx=[1], expansion=0.5, depth_mult=0.34)
    cached = make_realistic(
        HybridEncoder(**tiny, eval_spatial_size=[IMAGE_HEIGHT, IMAGE_WIDTH]), [features(tiny, 1)]
    )
    uncached = HybridEncoder(**tiny).eval()
    uncached.load_state_dict(cached.state_dict(), strict=True)
    assert "pos_embed1" not in cached.state_dict()  # not a checkpoint entry, as in the original
    torch.testing.assert_close(cached.pos_embed1, sincos_position_embedding(4, 3, 32))
    with torch.no_grad():
        for height, width in [(IMAGE_HEIGHT, IMAGE_WIDTH), (64, 160)]:
            inputs = features(tiny, seed=4, height=height, width=width)
            assert_all_close(cached(inputs), uncached(inputs), atol=0)


def test_frozen_norms_keep_their_statistics_in_train_mode():
    backbone = realistic_backbone("s", **SMALL, freeze_norm=True)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert not any("num_batches_tracked" in key for key in before)
    parameter_names = {name for name, _ in backbone.named_parameters()}
    assert not any(".bn." in name for name in parameter_names)
    backbone.train()(images(5, **SMALL))
    after = backbone.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)


def test_unfrozen_norms_update_their_statistics_in_train_mode():
    backbone = HGNetv2("B0", freeze_at=-1, freeze_norm=False).train()
    backbone(images(5, **SMALL))
    assert float(backbone.stem.stem1.bn.running_mean.abs().sum()) > 0


@pytest.mark.parametrize(
    ("freeze_at", "freeze_stem_only", "frozen_stages"),
    [(-1, True, 0), (0, True, 0), (1, False, 2), (3, False, 4)],
)
def test_freeze_at_turns_off_gradients_of_stem_and_early_stages(
    freeze_at: int, freeze_stem_only: bool, frozen_stages: int
):
    backbone = HGNetv2("B0", freeze_at=freeze_at, freeze_stem_only=freeze_stem_only, freeze_norm=False)
    assert all(p.requires_grad == (freeze_at < 0) for p in backbone.stem.parameters())
    for index, stage in enumerate(backbone.stages):
        assert all(p.requires_grad == (index >= frozen_stages) for p in stage.parameters()), index


def test_pretrained_weights_load_from_a_local_file(tmp_path: Path):
    generator = torch.Generator().manual_seed(0)
    weights = {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value + 7
        for key, value in HGNetv2(**BACKBONES["s"]).state_dict().items()
    }
    plain, wrapped, whole = tmp_path / "plain.pth", tmp_path / "wrapped.pth", tmp_path / "whole.pth"
    torch.save(weights, plain)
    torch.save({"model": weights}, wrapped)
    torch.save(
        {"model": {f"backbone.{k}": v for k, v in weights.items()} | {"encoder.x": torch.ones(1)}}, whole
    )
    for file in (plain, wrapped, whole):
        for freeze_norm in (False, True):  # frozen norms drop num_batches_tracked
            loaded = HGNetv2(**{**BACKBONES["s"], "freeze_norm": freeze_norm}, pretrained=str(file))
            for key, value in loaded.state_dict().items():
                torch.testing.assert_close(value, weights[key], msg=key)


def test_missing_pretrained_file_names_the_path_and_where_weights_come_from(tmp_path: Path):
    missing = tmp_path / "PPHGNetV2_B0_stage1.pth"
    with pytest.raises(FileNotFoundError) as error:
        HGNetv2("B0", pretrained=str(missing))
    message = str(error.value)
    assert str(missing) in message and "never downloads" in message
    assert "PPHGNetV2_B0_stage1.pth" in message and "https://" in message
    with pytest.raises(ValueError, match="never downloads"):
        HGNetv2("B0", pretrained=True)  # type: ignore[arg-type]


def test_pretrained_weights_with_wrong_keys_are_listed(tmp_path: Path):
    file = tmp_path / "b2.pth"
    torch.save(HGNetv2("B2", use_lab=False).state_dict(), file)
    with pytest.raises(ValueError, match=r"missing: .*lab\.scale.*shape mismatch: stem\.stem1\.conv\.weight"):
        HGNetv2("B0", use_lab=True, pretrained=str(file))


def test_bad_arguments_raise_errors_that_name_the_choices():
    with pytest.raises(ValueError, match="B0, B1, B2, B3, B4, B5, B6"):
        HGNetv2("B7")
    with pytest.raises(ValueError, match="return_idx"):
        HGNetv2("B0", return_idx=[3, 4])
    with pytest.raises(ValueError, match="'relu', 'silu', 'gelu'"):
        get_activation("tanh")
    with pytest.raises(ValueError, match="use_encoder_idx"):
        HybridEncoder(**{**ENCODERS["n"], "use_encoder_idx": [2]})
    with pytest.raises(ValueError, match="2 feature maps"):
        HybridEncoder(in_channels=[8, 8, 8], hidden_dim=32, nhead=4)([torch.zeros(1, 8, 4, 4)] * 2)
