"""Our D-FINE against HuggingFace's ``DFineForObjectDetection`` on the same weights (dfine.hf.conversion).

For N, S and a tiny custom size (M, L and X too, marked slow): our model gets realistic weights (noise on
every parameter, BatchNorm statistics from random batches), its state dict is converted and loaded into HF's
model with strict keys, and both run in eval mode on the same images. N has only strides 16 and 32, so it
needs 256-pixel images to offer its 300 queries enough encoder cells; the others run at 160 pixels or less.
Inputs are square: for H != W the HF port's encoder position embedding differs from the original's.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import dfine
from dfine.hf.conversion import (
    dfine_to_hf_state_dict,
    hf_config_from_dfine_config,
    hf_to_dfine_state_dict,
    load_hf_pretrained,
    save_hf_pretrained,
)

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4

# A few-second stand-in with every layout feature of the big models: a frozen backbone norm (L, X), encoder
# and decoder widths that differ (decoder input projections, as in X), per-level sampling points, 16 bins.
TINY = (
    "num_classes=5",
    "model.backbone.freeze_norm=true",
    "model.encoder.hidden_dim=48",
    "model.encoder.dim_feedforward=64",
    "model.encoder.nhead=4",
    "model.decoder.hidden_dim=32",
    "model.decoder.feat_channels=[48, 48, 48]",
    "model.decoder.dim_feedforward=64",
    "model.decoder.nhead=4",
    "model.decoder.num_layers=2",
    "model.decoder.num_queries=30",
    "model.decoder.reg_max=16",
)
# size -> (config, overrides, batch size, image side)
SIZES = {
    "n": ("dfine_hgnetv2_n_coco.yml", (), 1, 256),
    "s": ("dfine_hgnetv2_s_coco.yml", (), 2, 160),
    "tiny": ("dfine_hgnetv2_s_coco.yml", TINY, 2, 64),
    "m": ("dfine_hgnetv2_m_coco.yml", (), 1, 160),
    "l": ("dfine_hgnetv2_l_coco.yml", (), 1, 160),
    "x": ("dfine_hgnetv2_x_coco.yml", (), 1, 160),
}
# M, L and X add the B2/B4/B5 backbones, frozen backbone norms, 384-channel decoder inputs and reg_scale 8
SLOW_SIZES = ("m", "l", "x")


def load(size: str, *extra: str, side: int | None = None) -> dict:
    file, overrides, _, default_side = SIZES[size]
    side = side or default_side
    return dfine.load_config(
        ROOT / "configs/dfine" / file, [*overrides, f"eval_spatial_size=[{side}, {side}]", *extra]
    )


def make_realistic(model: nn.Module, side: int, seed: int = 0) -> None:
    """Noise (std 0.02) on every learnt tensor, BatchNorm statistics measured on two random images.

    As initialised, the zero heads make every box its anchor and the default statistics make the encoder's
    top-k scores tie, so a broken decoder or a reordering would go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rpartition(".")[2] not in ("up", "reg_scale"):  # constants of the weighting function
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
        norms = []
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                norms.append(module)
            elif type(module).__name__ == "FrozenBatchNorm2d":
                module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.add_(0.05 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # plain average over the calibration batches
            norm.train()
        for _ in range(2):
            model(torch.rand(1, 3, side, side, generator=gen))
        for norm in norms:
            norm.momentum = 0.1
            norm.eval()


@dataclass
class Pair:
    size: str
    cfg: dict
    ours: nn.Module
    hf: nn.Module
    ours_state: dict[str, Tensor]
    load_result: object
    images: Tensor


@pytest.fixture(
    scope="module",
    params=[pytest.param(size, marks=[pytest.mark.slow] if size in SLOW_SIZES else []) for size in SIZES],
)
def pair(request: pytest.FixtureRequest) -> Pair:
    size = request.param
    _, _, batch_size, side = SIZES[size]
    torch.manual_seed(0)
    cfg = load(size)
    ours = dfine.build_model(cfg)
    make_realistic(ours, side)
    state = ours.state_dict()
    hf = transformers.DFineForObjectDetection(hf_config_from_dfine_config(cfg)).eval()
    load_result = hf.load_state_dict(dfine_to_hf_state_dict(state, cfg), strict=True)
    images = torch.rand(batch_size, 3, side, side, generator=torch.Generator().manual_seed(1))
    return Pair(size, cfg, ours, hf, state, load_result, images)


def matched_differences(pair: Pair, hf: nn.Module | None = None) -> tuple[float, float, int]:
    """Max |logits| and |boxes| differences, query by query, allowing swaps of near-tied queries.

    The encoder's top-k picks the decoder queries in score order; two cells whose scores differ by less than
    the two implementations' rounding (~1e-6) may come out in either order, which moves whole rows. Such a
    move is accepted only between positions at most 2 apart whose encoder scores differ by < 1e-4 (or, at the
    last position, a cell that lost its place to the next-ranked one); every other row must match in place.

    Returns:
        ``(max logits difference, max boxes difference, number of moved rows)``.
    """
    with torch.no_grad():
        ours = pair.ours(pair.images)
        theirs = (hf or pair.hf)(pixel_values=pair.images)
    ours_rows = torch.cat((ours["pred_logits"], ours["pred_boxes"]), dim=-1)  # [B, Q, C + 4]
    hf_rows = torch.cat((theirs.logits, theirs.pred_boxes), dim=-1)
    scores = theirs.enc_outputs_class.max(-1).values.sort(dim=-1, descending=True).values  # [B, S] ranked
    num_queries = ours_rows.shape[1]
    partner = torch.arange(num_queries).expand(ours_rows.shape[0], -1).clone()
    moved = 0
    for image in range(ours_rows.shape[0]):
        in_place = (ours_rows[image] - hf_rows[image]).abs().amax(-1) <= TOLERANCE
        for query in (~in_place).nonzero().flatten().tolist():
            moved += 1
            near = range(max(0, query - 2), min(num_queries, query + 3))
            swaps = [
                j for j in near if (ours_rows[image, query] - hf_rows[image, j]).abs().max() <= TOLERANCE
            ]
            if swaps:
                partner[image, query] = swaps[0]
                tied = abs(scores[image, query] - scores[image, swaps[0]]) < 1e-4
            else:  # pushed out of the top-k by the next-ranked cell
                tied = (
                    query == num_queries - 1 and abs(scores[image, query] - scores[image, query + 1]) < 1e-4
                )
                partner[image, query] = -1
            assert tied, f"image {image}, query {query}: outputs differ and no near-tied query explains it"
    keep = partner >= 0
    index = partner.clamp(min=0).unsqueeze(-1).expand_as(hf_rows)
    difference = (ours_rows - hf_rows.gather(1, index)).abs() * keep.unsqueeze(-1)
    classes = ours["pred_logits"].shape[-1]
    return difference[..., :classes].max().item(), difference[..., classes:].max().item(), moved


def test_converted_weights_load_into_hf_with_strict_keys(pair: Pair) -> None:
    assert not pair.load_result.missing_keys and not pair.load_result.unexpected_keys
    converted = dfine_to_hf_state_dict(pair.ours_state, pair.cfg)
    reference = pair.hf.state_dict()
    assert set(converted) == set(reference)
    assert all(converted[key].shape == reference[key].shape for key in reference)
    count = sum(p.numel() for p in pair.ours.parameters())
    assert sum(p.numel() for p in pair.hf.parameters()) == count


def test_hf_outputs_equal_ours_on_realistic_weights(pair: Pair) -> None:
    with torch.no_grad():
        boxes = pair.ours(pair.images)["pred_boxes"]
    assert boxes.std() > 0.05, "weights are not realistic: boxes barely differ"
    logits, boxes, moved = matched_differences(pair)
    print(
        f"\n{pair.size} {tuple(pair.images.shape)}: max |logits| {logits:.2e}, |boxes| {boxes:.2e}, "
        f"{moved} near-tied queries swapped"
    )
    assert logits <= TOLERANCE and boxes <= TOLERANCE
    assert moved <= 2 * pair.images.shape[0]


def test_round_trip_gives_back_every_tensor_bit_for_bit(pair: Pair) -> None:
    back = hf_to_dfine_state_dict(dfine_to_hf_state_dict(pair.ours_state, pair.cfg), pair.cfg)
    assert set(back) == set(pair.ours_state)
    for key, value in pair.ours_state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    hf_state = pair.hf.state_dict()
    again = dfine_to_hf_state_dict(hf_to_dfine_state_dict(hf_state, pair.cfg), pair.cfg)
    assert set(again) == set(hf_state)
    assert all(torch.equal(again[key], hf_state[key]) for key in hf_state)


def tiny_pair() -> Pair:
    torch.manual_seed(0)
    cfg = load("tiny")
    ours = dfine.build_model(cfg)
    make_realistic(ours, 64)
    state = ours.state_dict()
    hf = transformers.DFineForObjectDetection(hf_config_from_dfine_config(cfg)).eval()
    result = hf.load_state_dict(dfine_to_hf_state_dict(state, cfg), strict=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return Pair("tiny", cfg, ours, hf, state, result, images)


def test_saved_folder_loads_offline_with_from_pretrained_and_gives_same_outputs(tmp_path: Path) -> None:
    pair = tiny_pair()
    save_hf_pretrained(pair.ours_state, pair.cfg, tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded, info = transformers.DFineForObjectDetection.from_pretrained(
        tmp_path, output_loading_info=True, local_files_only=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded.eval()
    with torch.no_grad():
        expected, actual = pair.hf(pixel_values=pair.images), loaded(pixel_values=pair.images)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(actual.pred_boxes, expected.pred_boxes, rtol=0, atol=0)
    assert max(matched_differences(pair, loaded)[:2]) <= TOLERANCE

    state, config = load_hf_pretrained(tmp_path, pair.cfg)
    assert config.num_labels == 5 and config.eval_size is None
    assert set(state) == set(pair.ours_state)
    assert all(torch.equal(state[key], value) for key, value in pair.ours_state.items())
    # without our config, the folder's DFineConfig has no anchor size: no anchor buffers
    state, _ = load_hf_pretrained(tmp_path)
    assert set(pair.ours_state) - set(state) == {"decoder.anchors", "decoder.valid_mask"}


def test_anchors_and_step_counters_are_recreated_for_the_target_config() -> None:
    pair = tiny_pair()
    hf_state = pair.hf.state_dict()
    cfg = load("tiny", "model.backbone.freeze_norm=false", side=96)
    target = dfine.build_model(cfg)
    state = hf_to_dfine_state_dict(hf_state, cfg)
    target.load_state_dict(state, strict=True)
    assert torch.equal(state["decoder.anchors"], target.decoder.anchors)
    assert torch.equal(state["decoder.valid_mask"], target.decoder.valid_mask)
    counters = [key for key in state if key.startswith("backbone.") and key.endswith("num_batches_tracked")]
    assert counters and all(int(state[key]) == 0 for key in counters)
    # and back: an unfrozen backbone's counters are dropped for an HF config with frozen backbone norms
    frozen = dfine_to_hf_state_dict(state, pair.hf.config)
    assert set(frozen) == set(hf_state)


def test_unknown_keys_are_listed_in_a_value_error() -> None:
    pair = tiny_pair()
    state = dict(pair.ours_state)
    state["decoder.extra_head.weight"] = torch.zeros(1)
    state["module.backbone.stem.stem1.conv.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"decoder\.extra_head\.weight.*module\.backbone.*strip that prefix"):
        dfine_to_hf_state_dict(state, pair.cfg)
    hf_state = dict(pair.hf.state_dict())
    hf_state["model.mystery.bias"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"model\.mystery\.bias"):
        hf_to_dfine_state_dict(hf_state, pair.cfg)
    del hf_state["model.mystery.bias"]
    del hf_state["model.decoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="k missing"):
        hf_to_dfine_state_dict(hf_state, pair.cfg)


def test_shared_tensors_that_differ_are_rejected() -> None:
    pair = tiny_pair()
    state = dict(pair.ours_state)
    state["decoder.decoder.up"] = state["decoder.up"] + 1
    with pytest.raises(ValueError, match=r"model\.decoder\.up"):
        dfine_to_hf_state_dict(state, pair.cfg)
    hf_state = dict(pair.hf.state_dict())
    hf_state["class_embed.0.bias"] = hf_state["class_embed.0.bias"] + 1
    with pytest.raises(ValueError, match=r"decoder\.dec_score_head\.0\.bias"):
        hf_to_dfine_state_dict(hf_state, pair.cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.decoder.eval_idx=-2", "eval_idx"),
        ("model.decoder.query_select_method=agnostic", "query_select_method"),
        ("model.encoder.act=relu", "act"),
    ],
)
def test_settings_hf_cannot_express_raise_value_error(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf_config_from_dfine_config(load("tiny", override))


def test_hf_config_keeps_eval_size_and_anchor_size_unset() -> None:
    config = hf_config_from_dfine_config(load("n"))
    assert config.eval_size is None and config.anchor_image_size is None
    assert config.backbone_config.out_indices == [3, 4] and config.backbone_config.use_learnable_affine_block
    assert config.decoder_n_points == [6, 6] and config.num_feature_levels == 2 and config.d_model == 128


def test_missing_transformers_gives_an_import_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[hf\]"'):
        hf_config_from_dfine_config(load("tiny"))


def test_convert_weights_tool_goes_both_ways_and_fails_above_tolerance(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("convert_weights", ROOT / "tools" / "convert_weights.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pair = tiny_pair()
    checkpoint = tmp_path / "tiny.pth"
    torch.save({"ema": {"module": pair.ours_state}, "model": {}, "last_epoch": 3}, checkpoint)
    config = ["-c", str(ROOT / "configs/dfine/dfine_hgnetv2_s_coco.yml")]
    overrides = ["-u", *TINY, "eval_spatial_size=[64, 64]"]
    assert tool.main([*config, "-i", str(checkpoint), "-o", str(tmp_path / "hf"), *overrides]) == 0
    back = tmp_path / "back.pth"
    assert tool.main([*config, "-i", str(tmp_path / "hf"), "-o", str(back), *overrides]) == 0
    state = torch.load(back, weights_only=True)["model"]
    assert set(state) == set(pair.ours_state)
    assert all(torch.equal(state[key], value) for key, value in pair.ours_state.items())
    failing = [*config, "-i", str(checkpoint), "-o", str(tmp_path / "hf2"), "--tolerance", "-1", *overrides]
    assert tool.main(failing) == 1


@pytest.mark.original
def test_original_n_weights_convert_and_match_hf(original: Path) -> None:
    from src.core import YAMLConfig  # the original's config system (on sys.path through the fixture)

    theirs = YAMLConfig(
        str(original / "configs/dfine/dfine_hgnetv2_n_coco.yml"),
        HGNetv2={"pretrained": False},
        eval_spatial_size=[256, 256],
    ).model
    make_realistic(theirs, 256)
    cfg = load("n")
    hf = transformers.DFineForObjectDetection(hf_config_from_dfine_config(cfg)).eval()
    hf.load_state_dict(dfine_to_hf_state_dict(theirs.state_dict(), cfg), strict=True)
    images = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    pair = Pair("n (original)", cfg, theirs, hf, theirs.state_dict(), None, images)
    logits, boxes, _ = matched_differences(pair)
    assert logits <= TOLERANCE and boxes <= TOLERANCE
