"""DFINECriterion: parity with the original (recorded and live), per-term formulas against the HuggingFace
port, robustness (no boxes, many or degenerate boxes, AMP), DDP behaviour and one optimisation step."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import make_criterion_fixture
import pytest
import torch
from torch import Tensor, nn

from dfine.config.registry import ConfigError
from dfine.losses import DFINECriterion, HungarianMatcher, Pairs
from dfine.ops.fdr import distance_to_box, distribution_integral, weighting_function

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "criterion_parity.pt"
WEIGHTS = {"loss_vfl": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
COSTS = {"cost_class": 2, "cost_bbox": 5, "cost_giou": 2}


def make_criterion(num_classes: int, reg_max: int = 32, **kwargs: Any) -> DFINECriterion:
    settings = {"weight_dict": WEIGHTS, "losses": ["vfl", "boxes", "local"], "alpha": 0.75, "gamma": 2.0}
    settings.update(kwargs)
    matcher = HungarianMatcher(COSTS, alpha=0.25, gamma=2.0)
    return DFINECriterion(matcher, num_classes=num_classes, reg_max=reg_max, **settings)


def criterion_from_settings(settings: Mapping[str, Any]) -> DFINECriterion:
    settings = dict(settings)
    matcher = HungarianMatcher(**settings.pop("matcher"))
    return DFINECriterion(matcher, **settings)


def assert_terms_equal(ours: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> None:
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key].detach(), value.detach(), rtol=1e-4, atol=1e-7, msg=key)


# --------------------------------------------------------------------------------- recorded parity (CI)
@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return torch.load(FIXTURE, weights_only=True)


@pytest.mark.parametrize(
    ("case", "batch", "keep_denoising"),
    [("regular", "boxes", False), ("denoising", "boxes", True), ("no_boxes", "no_boxes", True)],
)
def test_loss_terms_equal_the_recorded_original_terms(
    recorded: dict[str, Any], case: str, batch: str, keep_denoising: bool
) -> None:
    criterion = criterion_from_settings(recorded["settings"])
    outputs = make_criterion_fixture.unpack_outputs(recorded["batches"][batch]["outputs"], keep_denoising)
    losses = criterion(outputs, recorded["batches"][batch]["targets"])
    assert_terms_equal(losses, recorded["losses"][case])
    assert len(losses) == {"regular": 20, "denoising": 38, "no_boxes": 38}[case]
    sum(losses.values()).backward()
    assert torch.isfinite(outputs["pred_corners"].grad).all()


def per_image(pairs: Pairs, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    return [
        (pairs.query_index[pairs.batch_index == b], pairs.target_index[pairs.batch_index == b] - offsets[b])
        for b in range(len(sizes))
    ]


def test_per_term_formulas_equal_the_huggingface_port_given_our_matches(recorded: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.loss.loss_d_fine import DFineLoss

    settings = recorded["settings"]
    hf = DFineLoss(transformers.DFineConfig(num_labels=settings["num_classes"]))
    criterion = criterion_from_settings(settings)
    batch = recorded["batches"]["boxes"]
    outputs = make_criterion_fixture.unpack_outputs(batch["outputs"], keep_denoising=False)
    targets = batch["targets"]
    sizes = [len(t["labels"]) for t in targets]
    losses = criterion(outputs, targets)
    matching = criterion.match(outputs, targets)
    union = per_image(matching.union, sizes)
    num_boxes, num_union = float(sum(sizes)), float(len(matching.union))
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]

    def hf_view(output: Mapping[str, Any]) -> dict[str, Any]:
        view = {("logits" if k == "pred_logits" else k): v for k, v in output.items()}
        view.setdefault("teacher_corners", output.get("pred_corners"))  # the final layer: DDF is 0
        view.setdefault("teacher_logits", output["pred_logits"])
        return view

    groups = [("", "main", outputs), ("_pre", "pre", outputs["pre_outputs"])]
    groups += [(f"_aux_{i}", f"aux_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])]
    groups += [(f"_enc_{i}", f"enc_{i}", enc) for i, enc in enumerate(outputs["enc_aux_outputs"])]
    for suffix, name, output in groups:
        view = hf_view(output)
        expected = hf.loss_labels_vfl(view, hf_targets, per_image(matching.own[name], sizes), num_boxes)
        expected |= hf.loss_boxes(view, hf_targets, union, num_union)
        if "pred_corners" in output:
            local = hf.loss_local(view, hf_targets, union, num_union)
            expected["loss_fgl"] = local["loss_fgl"]
            if "teacher_corners" in output:
                expected["loss_ddf"] = local["loss_ddf"]
        for key, value in expected.items():
            ours = losses[key + suffix] / WEIGHTS[key]
            torch.testing.assert_close(ours, value.detach(), rtol=1e-5, atol=1e-8, msg=key + suffix)


# ------------------------------------------------------------------------ a tiny detector for robustness
class TinyDetector(nn.Module):
    """Learnable queries -> the D-FINE training output layout (3 layers, corners, teachers, optional dn)."""

    def __init__(self, num_classes: int = 5, num_queries: int = 12, hidden: int = 16, num_denoising: int = 0):
        super().__init__()
        self.num_queries, self.num_denoising, self.reg_max = num_queries, num_denoising, 8
        self.queries = nn.Parameter(0.5 * torch.randn(num_queries, hidden))
        self.box_embed = nn.Linear(4, hidden)
        self.ref_head, self.enc_head, self.pre_head = (
            nn.Linear(hidden, 4),
            *(nn.Linear(hidden, num_classes) for _ in range(2)),
        )
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(3))
        self.score_heads = nn.ModuleList(nn.Linear(hidden, num_classes) for _ in range(3))
        self.corner_heads = nn.ModuleList(nn.Linear(hidden, 4 * (self.reg_max + 1)) for _ in range(3))
        self.register_buffer("up", torch.tensor([0.5]))
        self.register_buffer("reg_scale", torch.tensor([4.0]))

    def _decode(self, hidden: Tensor) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        ref = self.ref_head(hidden).sigmoid()
        pre = {"pred_logits": self.pre_head(hidden), "pred_boxes": ref}
        project = weighting_function(self.reg_max, self.up, self.reg_scale)
        layers, corners = [], 0
        for layer, score_head, corner_head in zip(
            self.layers, self.score_heads, self.corner_heads, strict=True
        ):
            hidden = torch.tanh(layer(hidden)) + hidden
            corners = corner_head(hidden) + corners
            boxes = distance_to_box(ref.detach(), distribution_integral(corners, project), self.reg_scale)
            layers.append({"pred_logits": score_head(hidden), "pred_boxes": boxes, "pred_corners": corners})
            layers[-1]["ref_points"] = ref.detach()
        for layer in layers[:-1]:
            layer["teacher_corners"], layer["teacher_logits"] = (
                layers[-1]["pred_corners"],
                layers[-1]["pred_logits"],
            )
        return layers, pre

    def forward(self, features: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        hidden = features + self.queries  # [B, Q, D]
        layers, pre = self._decode(hidden)
        outputs = {**layers[-1], "up": self.up, "reg_scale": self.reg_scale, "aux_outputs": layers[:-1]}
        outputs["pre_outputs"] = pre
        outputs["enc_aux_outputs"] = [{"pred_logits": self.enc_head(hidden), "pred_boxes": pre["pred_boxes"]}]
        outputs["enc_meta"] = {"class_agnostic": False}
        if self.num_denoising:
            outputs.update(self._denoising(targets))
        return outputs

    def _denoising(self, targets: list[dict[str, Tensor]]) -> dict[str, Any]:
        sizes = [len(t["labels"]) for t in targets]
        most = max(sizes)
        if most == 0:  # like a model that returns no denoising outputs for a batch without boxes
            return {
                "dn_meta": {"dn_positive_idx": None, "dn_num_group": 0, "dn_num_split": [0, self.num_queries]}
            }
        groups = max(self.num_denoising // most, 1)
        padded = torch.zeros(len(targets), most, 4)
        for b, t in enumerate(targets):
            padded[b, : sizes[b]] = t["boxes"]
        noised = torch.cat((padded, padded.flip(-1)), dim=1).repeat(1, groups, 1)  # [B, 2 * most * groups, 4]
        layers, pre = self._decode(self.box_embed(noised))
        for layer in layers:
            layer["teacher_corners"], layer["teacher_logits"] = (
                layers[-1]["pred_corners"],
                layers[-1]["pred_logits"],
            )
        positive = [torch.cat([torch.arange(n) + 2 * most * g for g in range(groups)]) for n in sizes]
        meta = {
            "dn_positive_idx": positive,
            "dn_num_group": groups,
            "dn_num_split": [2 * most * groups, self.num_queries],
        }
        return {"dn_outputs": layers, "dn_pre_outputs": pre, "dn_meta": meta}


def tiny_batch(sizes: list[int], seed: int = 0, hidden: int = 16) -> tuple[Tensor, list[dict[str, Tensor]]]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(sizes), 12, hidden, generator=generator)
    targets = []
    for n in sizes:
        centre = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
        extent = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
        targets.append(
            {
                "labels": torch.randint(0, 5, (n,), generator=generator),
                "boxes": torch.cat((centre, extent), 1),
            }
        )
    return features, targets


def total(losses: Mapping[str, Tensor]) -> Tensor:
    return sum(losses.values())  # type: ignore[return-value]


def test_one_adamw_step_lowers_the_loss_and_every_parameter_gets_a_finite_gradient() -> None:
    torch.manual_seed(0)
    model, criterion = TinyDetector(num_denoising=8), make_criterion(5, reg_max=8)
    features, targets = tiny_batch([3, 1, 4])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = total(criterion(model(features, targets), targets))
    before.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(parameter.grad).all(), name
    optimizer.step()
    with torch.no_grad():
        after = total(criterion(model(features, targets), targets))
    assert after < before


def test_zero_box_image_hundreds_of_boxes_and_degenerate_boxes_give_finite_losses_and_gradients() -> None:
    torch.manual_seed(0)
    model, criterion = TinyDetector(num_denoising=8), make_criterion(5, reg_max=8)
    features, targets = tiny_batch([0, 300, 4, 1])
    targets[2]["boxes"][:, 2] = 0.0  # zero width
    targets[2]["boxes"][:2, 3] = 0.0  # zero area, both sides
    outputs = model(features, targets)
    with torch.no_grad():  # and predictions of zero size
        outputs["pred_boxes"][2, :3, 2:] = 0.0
    losses = criterion(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    total(losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batch_without_boxes_returns_the_same_keys_as_a_normal_batch_and_backpropagates() -> None:
    torch.manual_seed(0)
    model, criterion = TinyDetector(num_denoising=8), make_criterion(5, reg_max=8)
    normal = criterion(model(*tiny_batch([2, 1])), tiny_batch([2, 1])[1])
    features, targets = tiny_batch([0, 0])
    outputs = model(features, targets)
    assert "dn_outputs" not in outputs
    empty = criterion(outputs, targets)
    assert list(empty) == list(normal)
    assert all(empty[k] == 0 for k in empty if "_dn_" in k)
    assert all(empty[k] == 0 for k in empty if "bbox" in k or "giou" in k or "fgl" in k)
    assert empty["loss_vfl"] > 0
    total(empty).backward()
    assert model.score_heads[0].weight.grad is not None


def test_losses_are_float32_when_outputs_come_from_autocast() -> None:
    torch.manual_seed(0)
    model, criterion = TinyDetector(num_denoising=8), make_criterion(5, reg_max=8)
    features, targets = tiny_batch([3, 2])
    reference = criterion(model(features, targets), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(features, targets)
        assert outputs["pred_logits"].dtype == torch.bfloat16
        losses = criterion(outputs, targets)
    assert list(losses) == list(reference)
    for key, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
    torch.testing.assert_close(total(losses), total(reference), rtol=0.1, atol=0.0)


def test_criterion_keeps_no_state_between_calls() -> None:
    torch.manual_seed(0)
    model, criterion = TinyDetector(num_denoising=8), make_criterion(5, reg_max=8)
    attributes = dict(vars(criterion))
    first_batch, second_batch = tiny_batch([2, 3], seed=1), tiny_batch([1, 4], seed=2)
    first = criterion(model(*first_batch), first_batch[1])
    criterion(model(*second_batch), second_batch[1])
    again = criterion(model(*first_batch), first_batch[1])
    assert vars(criterion).keys() == attributes.keys()
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)


def test_focal_loss_option_and_boxes_weight_format_give_their_terms() -> None:
    torch.manual_seed(0)
    model = TinyDetector()
    features, targets = tiny_batch([3, 2])
    weights = {**WEIGHTS, "loss_focal": 1.0}
    focal = make_criterion(5, reg_max=8, losses=["focal", "boxes", "local"], weight_dict=weights)
    losses = focal(model(features, targets), targets)
    assert "loss_focal" in losses and "loss_vfl" not in losses and "loss_focal_aux_1" in losses
    plain = make_criterion(5, reg_max=8)(model(features, targets), targets)
    weighted = make_criterion(5, reg_max=8, boxes_weight_format="iou")(model(features, targets), targets)
    assert weighted["loss_giou"] < plain["loss_giou"]  # GIoU loss scaled by IoU < 1
    torch.testing.assert_close(weighted["loss_vfl"], plain["loss_vfl"])  # the IoU target is the default


def test_class_agnostic_encoder_is_matched_and_scored_against_one_class() -> None:
    torch.manual_seed(0)
    model, criterion = TinyDetector(), make_criterion(5, reg_max=8)
    features, targets = tiny_batch([3, 2])
    outputs = model(features, targets)
    encoder = outputs["enc_aux_outputs"][0]
    encoder["pred_logits"] = encoder["pred_logits"][..., :1]  # one objectness score per query
    outputs["enc_meta"] = {"class_agnostic": True}
    losses = criterion(outputs, targets)
    assert torch.isfinite(losses["loss_vfl_enc_0"]) and losses["loss_vfl_enc_0"] > 0
    assert len(losses) == 20


def test_outputs_with_only_boxes_and_logits_give_the_main_terms() -> None:
    criterion = make_criterion(5, reg_max=8, losses=["vfl", "boxes"])
    features, targets = tiny_batch([3, 0])
    outputs = TinyDetector()(features, targets)
    losses = criterion({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}, targets)
    assert list(losses) == ["loss_vfl", "loss_bbox", "loss_giou"]


def test_criterion_config_errors_name_the_bad_value() -> None:
    matcher = HungarianMatcher(COSTS)
    with pytest.raises(ConfigError, match="Did you mean 'loss_giou'"):
        DFINECriterion(matcher, {"loss_vfl": 1, "loss_gio": 2}, ["vfl"])
    with pytest.raises(ConfigError, match="unknown loss 'box'"):
        DFINECriterion(matcher, WEIGHTS, ["vfl", "box"])
    with pytest.raises(ConfigError, match="none of its terms"):
        DFINECriterion(matcher, {"loss_vfl": 1}, ["vfl", "boxes"])
    with pytest.raises(TypeError, match="built HungarianMatcher"):
        DFINECriterion({"type": "HungarianMatcher"}, WEIGHTS, ["vfl"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes=7"):
        model = TinyDetector()
        make_criterion(7, reg_max=8)(model(*tiny_batch([1])), tiny_batch([1])[1])


# ------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    torch.manual_seed(0)
    model, criterion = TinyDetector(num_denoising=8), make_criterion(5, reg_max=8)
    features, targets = tiny_batch([3, 2] if rank == 0 else [0, 0], seed=rank)
    alone = {k: v.detach() for k, v in criterion(model(features, targets), targets).items()}
    union = len(criterion.match(model(features, targets), targets).union)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        losses = criterion(model(features, targets), targets)
        total(losses).backward()
        torch.save(
            {"alone": alone, "ddp": {k: v.detach() for k, v in losses.items()}, "union": union},
            f"{result_dir}/{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow
def test_ranks_share_keys_and_normalisers_when_one_rank_has_no_boxes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    args = (str(tmp_path / "init"), str(tmp_path))
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    busy, idle = (torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in (0, 1))
    assert list(busy["ddp"]) == list(idle["ddp"]) == list(busy["alone"])
    # rank 0 alone divides by its own counts; under DDP by the average over both ranks (half of them)
    torch.testing.assert_close(busy["ddp"]["loss_vfl"], busy["alone"]["loss_vfl"] * 2)
    torch.testing.assert_close(busy["ddp"]["loss_bbox"], busy["alone"]["loss_bbox"] * 2)
    torch.testing.assert_close(idle["ddp"]["loss_vfl"], idle["alone"]["loss_vfl"] / (5 / 2))
    assert busy["union"] >= 5 and idle["union"] == 0


# ------------------------------------------------------------------------------------ live original
@pytest.mark.original
@pytest.mark.slow
@pytest.mark.parametrize(("num_denoising", "weights"), [(0, "noise"), (100, "noise"), (100, "realistic")])
def test_every_term_and_gradient_equals_the_original_on_the_n_model(
    original: Path, num_denoising: int, weights: str
) -> None:
    from dfine.models.realistic_weights import realistic_state_dict

    tools = make_criterion_fixture
    model, theirs = tools.build_original(original, num_denoising=num_denoising)
    if weights == "noise":
        tools.perturb_weights(model, image_size=320)
    else:  # larger weights: saturated scores, many ties in the matching
        model.load_state_dict(realistic_state_dict(model, seed=3))
    outputs, targets = tools.run_model(model, [5, 0, 3], 80, 320, seed=4)
    their_outputs, our_outputs = tools.clone_outputs(outputs), tools.clone_outputs(outputs)
    expected = theirs(their_outputs, targets)
    losses = make_criterion(80)(our_outputs, targets)
    assert_terms_equal(losses, expected)
    assert len(losses) == (38 if num_denoising else 20)
    assert expected["loss_ddf_aux_0"] > 0
    total(expected).backward()
    total(losses).backward()
    for key in ("pred_logits", "pred_boxes", "pred_corners"):
        torch.testing.assert_close(our_outputs[key].grad, their_outputs[key].grad, rtol=1e-4, atol=1e-9)
        aux_grad = our_outputs["aux_outputs"][0][key].grad
        torch.testing.assert_close(aux_grad, their_outputs["aux_outputs"][0][key].grad, rtol=1e-4, atol=1e-9)


@pytest.mark.original
def test_union_of_matches_equals_the_original_including_ties(original: Path) -> None:
    from src.zoo.dfine.dfine_criterion import DFINECriterion as OriginalCriterion

    from dfine.losses.pairs import union_of_matches

    generator = torch.Generator().manual_seed(0)
    for size in (0, 1, 6, 40):
        matches = []
        for _ in range(5):  # five outputs choosing among few queries: many equally frequent pairs
            queries = torch.randperm(12, generator=generator)[: min(size, 12)]
            matches.append([(queries, torch.randint(0, max(size, 1), (len(queries),), generator=generator))])
        expected = OriginalCriterion._get_go_indices(None, matches[0], matches[1:])
        [(queries, targets)] = union_of_matches(matches)
        assert queries.tolist() == expected[0][0].tolist()
        assert targets.tolist() == expected[0][1].tolist()
