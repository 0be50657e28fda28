"""Plots: PNGs of the expected size, missing val keys, stage switches, legends, life without matplotlib."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from dfine.engine import plots
from dfine.evaluation.curves import detection_curves


def history(epochs: int = 6, stage_two_from: int | None = 4) -> list[dict]:
    records = []
    for epoch in range(epochs):
        record = {
            "epoch": epoch,
            "stage": 2 if stage_two_from is not None and epoch >= stage_two_from else 1,
            "time": 1.0,
            "loss": 20.0 - epoch,
            "loss_vfl": 1.0 - 0.05 * epoch,
            "loss_bbox": 0.4 / (epoch + 1),
            "loss_giou": 0.9 - 0.02 * epoch,
            "loss_fgl": 0.3,
            "loss_ddf_aux_0": 0.01 * epoch,
            "loss_vfl_aux_0": 1.1,
            "loss_vfl_dn_0": 1.2,
            "loss_vfl_pre": 1.3,
            "loss_vfl_enc_0": 1.4,
            "lr": 8e-4 * 0.9**epoch,
        }
        if epoch % 2 == 1:  # evaluated every other epoch only
            record.update(val_AP=0.05 * epoch, val_AP50=0.08 * epoch, val_AP75=0.04 * epoch)
        records.append(record)
    return records


def curves(num_classes: int = 3):
    """Every class present; true detections score 0.5..1, wrong boxes 0..0.4: the best F1 is mid-grid."""
    rng = np.random.default_rng(0)
    annotations, results = [], []
    for index in range(max(12, num_classes)):
        image_id, category = index % 4 + 1, index % num_classes + 1
        box = [*rng.uniform(0, 200, 2), *rng.uniform(10, 50, 2)]
        annotations.append({"id": index + 1, "image_id": image_id, "category_id": category, "bbox": box})
        shifted = [box[0] + rng.normal(0, 2), box[1] + rng.normal(0, 2), box[2], box[3]]
        results.append(
            {"image_id": image_id, "category_id": category, "bbox": shifted, "score": rng.uniform(0.5, 1)}
        )
        wrong = [*rng.uniform(300, 400, 2), 20, 20]
        results.append(
            {"image_id": image_id, "category_id": category, "bbox": wrong, "score": rng.uniform(0, 0.4)}
        )
    gt = {
        "images": [{"id": i} for i in range(1, 5)],
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)],
    }
    return detection_curves(gt, results)


def open_png(path, size) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 1000, f"{path} missing or empty"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        return np.asarray(image.convert("RGB"))


def red_pixels(pixels: np.ndarray) -> int:
    """Pixels near matplotlib's 'tab:red' (214, 39, 40), the colour of the stage and best-threshold marks."""
    return int((np.abs(pixels.astype(int) - [214, 39, 40]).sum(axis=-1) < 60).sum())


def history_without_evaluation() -> list[dict]:
    """One stage, never evaluated, a NaN loss term and COCOeval's -1 ("undefined") AP."""
    records = history(3, stage_two_from=None)
    for record in records:
        record.pop("val_AP", None), record.pop("val_AP50", None)
    records[1]["loss_ddf_aux_0"] = float("nan")
    records.append({"epoch": 3, "stage": 1, "loss": 16.0, "val_AP": -1.0})
    return records


def test_plot_results_writes_the_grid_with_a_stage_two_line(tmp_path):
    pytest.importorskip("matplotlib")
    path = plots.plot_results(history(), tmp_path / "out" / "results.png")
    assert path == tmp_path / "out" / "results.png"
    with_switch = open_png(path, (1200, 700))
    plain = plots.plot_results(history_without_evaluation(), tmp_path / "plain.png")
    assert red_pixels(with_switch) > 9 * 50, "each of the 9 panels should carry the dashed stage-2 line"
    assert red_pixels(open_png(plain, (1200, 700))) == 0


def test_plot_results_draws_only_main_terms_and_skips_epochs_without_evaluation():
    pytest.importorskip("matplotlib")
    figure = plots._results_figure(history())
    titles = [axes.get_title() for axes in figure.axes if axes.get_visible()]
    assert titles == [
        "loss",
        "loss_vfl",
        "loss_bbox",
        "loss_giou",
        "loss_fgl",
        "loss_ddf_aux_0",
        "lr",
        "val_AP",
        "val_AP50",
    ]
    # DDF has only auxiliary terms (the last layer is its teacher): its first one stands for it
    others = [title for title in titles if title != "loss_ddf_aux_0"]
    assert not any(key in title for title in others for key in ("aux", "dn_", "pre", "enc"))
    val_ap = figure.axes[titles.index("val_AP")]
    epochs, values = val_ap.lines[0].get_data()
    np.testing.assert_allclose(epochs, [1, 3, 5])  # evaluated epochs only
    np.testing.assert_allclose(values, [0.05, 0.15, 0.25])
    stage_lines = [line for line in val_ap.lines[1:] if line.get_label() == "stage 2"]
    assert len(stage_lines) == 1 and stage_lines[0].get_xdata()[0] == 3.5  # between epochs 3 and 4


def test_plot_results_skips_missing_non_finite_and_undefined_values():
    pytest.importorskip("matplotlib")
    by_title = {axes.get_title(): axes for axes in plots._results_figure(history_without_evaluation()).axes}
    assert not by_title["val_AP"].lines and by_title["val_AP"].texts[0].get_text() == "not recorded"
    np.testing.assert_allclose(by_title["loss_ddf_aux_0"].lines[0].get_xdata(), [0, 2])
    np.testing.assert_allclose(by_title["loss"].lines[0].get_ydata(), [20, 19, 18, 16])


def test_pr_curve_lists_each_class_ap_and_the_mean(tmp_path):
    pytest.importorskip("matplotlib")
    result = curves(3)
    open_png(plots.plot_pr_curve(result, tmp_path / "pr_curve.png"), (800, 500))
    legend = [text.get_text() for text in plots._pr_figure(result).axes[0].get_legend().get_texts()]
    shown = [i for i, has in enumerate(result.has_ground_truth) if has]
    expected = [f"{result.category_names[i]} {result.ap[i]:.3f}" for i in shown]
    assert legend == [*expected, f"all classes {result.mean_ap:.3f} mAP@0.5"]


def test_many_classes_get_no_per_class_legend(tmp_path):
    pytest.importorskip("matplotlib")
    result = curves(30)
    assert result.has_ground_truth.sum() > plots.MAX_LEGEND_CLASSES
    legend = [text.get_text() for text in plots._pr_figure(result).axes[0].get_legend().get_texts()]
    assert legend == [f"all classes {result.mean_ap:.3f} mAP@0.5"]
    open_png(plots.plot_f1_curve(result, tmp_path / "f1_curve.png"), (800, 500))


def test_f1_curve_marks_the_best_threshold_in_the_plot_and_title(tmp_path):
    pytest.importorskip("matplotlib")
    result = curves(3)
    assert 0.3 < result.best_threshold <= 0.5, "the fixture should put the best threshold mid-grid"
    pixels = open_png(plots.plot_f1_curve(result, tmp_path / "f1_curve.png"), (800, 500))
    assert red_pixels(pixels) > 100, "the best-threshold line should be drawn"
    axes = plots._f1_figure(result).axes[0]
    assert f"best F1 {result.best_f1:.3f} at confidence {result.best_threshold:.2f}" in axes.get_title()
    marks = [line for line in axes.lines if line.get_label().startswith("best")]
    assert marks and marks[0].get_xdata()[0] == result.best_threshold


def test_curve_plots_work_without_any_ground_truth(tmp_path):
    pytest.importorskip("matplotlib")
    empty = detection_curves({"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1}]}, [])
    open_png(plots.plot_pr_curve(empty, tmp_path / "pr.png"), (800, 500))
    open_png(plots.plot_f1_curve(empty, tmp_path / "f1.png"), (800, 500))


def test_missing_matplotlib_is_reported_with_the_install_command(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # a None entry makes `import name` raise ImportError
    assert plots.matplotlib_available() is False
    for draw, argument in ((plots.plot_results, history()), (plots.plot_pr_curve, curves(2))):
        with pytest.raises(ImportError, match=r'pip install -e "\.\[plots\]"'):
            draw(argument, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_matplotlib_available_when_installed():
    pytest.importorskip("matplotlib")
    assert plots.matplotlib_available() is True
