"""Training pictures: ``results.png`` (losses, lr and AP per epoch), ``pr_curve.png`` and ``f1_curve.png``.

matplotlib is optional (``pip install -e ".[plots]"``): check :func:`matplotlib_available` before plotting, or
catch the ImportError each plot function raises without it. Figures are drawn with the object-oriented API
(``Figure`` on an Agg canvas), never pyplot, so plotting touches no global state and no backend setting and
is safe in a training process or a thread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfine.evaluation.curves import DetectionCurves

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "CURVE_FIGURE_SIZE",
    "DPI",
    "RESULTS_FIGURE_SIZE",
    "RESULTS_PANELS",
    "matplotlib_available",
    "plot_f1_curve",
    "plot_pr_curve",
    "plot_results",
]

DPI = 100
RESULTS_FIGURE_SIZE = (12.0, 7.0)  # inches: 1200 x 700 pixels at DPI
CURVE_FIGURE_SIZE = (8.0, 5.0)  # inches: 800 x 500 pixels at DPI
# History keys drawn by plot_results, one panel each: the total, the main-output loss terms (their aux_, dn_,
# pre and enc_ variants follow the same trend and would only crowd the grid), the learning rate and AP.
RESULTS_PANELS = (
    "loss",
    "loss_vfl",
    "loss_bbox",
    "loss_giou",
    "loss_fgl",
    "loss_ddf_aux_0",  # DDF distils the last layer into the others: it has no main-output term
    "lr",
    "val_AP",
    "val_AP50",
)
MAX_LEGEND_CLASSES = 20  # beyond this, per-class legend entries hide the curves
_INSTALL_HINT = 'pip install -e ".[plots]" (or pip install matplotlib)'


def matplotlib_available() -> bool:
    """Whether matplotlib (with its Agg renderer) can be imported, i.e. whether the plot functions work."""
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(size: tuple[float, float]) -> Figure:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"plotting needs matplotlib, which is not installed: {_INSTALL_HINT}") from error
    # Fixed margins instead of a layout engine: constrained layout costs about a second on the results grid.
    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)  # attaches itself as figure.canvas
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(epochs, values)`` of the records holding a finite number under ``key`` (AP < 0 means undefined)."""
    epochs, values = [], []
    for index, record in enumerate(history):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if key.startswith("val_") and value < 0:  # COCOeval's -1: no objects of that kind
            continue
        epochs.append(float(record.get("epoch", index)))
        values.append(float(value))
    return epochs, values


def _stage_switches(history: Sequence[Mapping[str, Any]]) -> list[float]:
    """Epoch positions (half-way between two records) where the ``stage`` key changes."""
    switches = []
    for index in range(1, len(history)):
        before, after = history[index - 1], history[index]
        if "stage" in before and "stage" in after and before["stage"] != after["stage"]:
            switches.append((float(before.get("epoch", index - 1)) + float(after.get("epoch", index))) / 2)
    return switches


def plot_results(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Draw the training history as a grid of per-epoch panels (see :data:`RESULTS_PANELS`).

    Args:
        history: the trainer's per-epoch records, ``[{"epoch", "stage", "loss", "loss_vfl", ..., "lr",
            "val_AP"?, "val_AP50"?}]``. Keys missing from a record (e.g. val_* on epochs without evaluation)
            are skipped; a panel whose key is never recorded says so. A change of ``stage`` (D-FINE's
            second training stage) is marked by a dashed vertical line in every panel.
        path: where the PNG goes (e.g. ``output_dir / "results.png"``); parent folders are created.

    Returns:
        ``path`` as a Path.

    Raises:
        ImportError: matplotlib is not installed.
    """
    return _save(_results_figure(history), path)


def _results_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    figure = _new_figure(RESULTS_FIGURE_SIZE)
    columns = 3
    rows = math.ceil(len(RESULTS_PANELS) / columns)
    axes_grid = figure.subplots(rows, columns, squeeze=False, sharex=True)
    switches = _stage_switches(history)
    for index, key in enumerate(RESULTS_PANELS):
        axes: Axes = axes_grid[index // columns][index % columns]
        epochs, values = _series(history, key)
        axes.set_title(key, fontsize=10)
        axes.locator_params(nbins=4)  # fewer ticks: tick layout is most of the drawing time
        axes.tick_params(labelsize=8)
        if values:
            axes.plot(epochs, values, marker="." if len(values) < 30 else None, linewidth=1.5)
        else:
            axes.text(
                0.5, 0.5, "not recorded", ha="center", va="center", transform=axes.transAxes, color="0.5"
            )
        for switch in switches:
            axes.axvline(switch, color="tab:red", linestyle="--", linewidth=1, label="stage 2")
        if index // columns == rows - 1:
            axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    if switches:
        axes_grid[0][0].legend(fontsize=8, loc="upper right")  # total loss falls: that corner is free
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.95, hspace=0.35, wspace=0.22)
    for index in range(len(RESULTS_PANELS), rows * columns):
        axes_grid[index // columns][index % columns].set_visible(False)
    return figure


def _class_colors(count: int) -> list[Any]:
    """One color per class: distinct when the legend lists them, quiet grey when there are too many."""
    if count > MAX_LEGEND_CLASSES:
        return ["0.6"] * count
    from matplotlib import colormaps

    colormap = colormaps["tab20" if count > 10 else "tab10"]
    return [colormap(index % colormap.N) for index in range(count)]


def _draw_classes(axes: Axes, x: Any, rows: Any, labels: list[str]) -> None:
    colors = _class_colors(len(labels))
    show = len(labels) <= MAX_LEGEND_CLASSES
    for row, label, color in zip(rows, labels, colors, strict=True):
        axes.plot(x, row, linewidth=1, alpha=0.7, color=color, label=label if show else None)


def _finish_curve_axes(figure: Figure, axes: Axes, xlabel: str, ylabel: str, has_classes: bool) -> None:
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if not has_classes:
        axes.text(0.5, 0.5, "no class has ground truth", ha="center", va="center", transform=axes.transAxes)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, borderaxespad=0)
    figure.subplots_adjust(left=0.08, right=0.74, bottom=0.11, top=0.92)


def plot_pr_curve(curves: DetectionCurves, path: str | Path) -> Path:
    """Precision vs recall per class (thin, AP in the legend) and over all classes (thick, mAP).

    Args:
        curves: from :func:`dfine.evaluation.curves.detection_curves`; classes without ground truth are
            left out.
        path: where the PNG goes (e.g. ``output_dir / "pr_curve.png"``); parent folders are created.

    Returns:
        ``path`` as a Path.

    Raises:
        ImportError: matplotlib is not installed.
    """
    return _save(_pr_figure(curves), path)


def _pr_figure(curves: DetectionCurves) -> Figure:
    figure = _new_figure(CURVE_FIGURE_SIZE)
    axes = figure.subplots()
    keep = curves.has_ground_truth
    labels = [
        f"{name} {ap:.3f}" for name, ap, k in zip(curves.category_names, curves.ap, keep, strict=True) if k
    ]
    _draw_classes(axes, curves.recall_grid, curves.precision_at_recall[keep], labels)
    iou = f"{curves.iou_threshold:g}"
    axes.plot(
        curves.recall_grid,
        curves.mean_precision_at_recall,
        linewidth=3,
        color="tab:blue",
        label=f"all classes {curves.mean_ap:.3f} mAP@{iou}",
    )
    axes.set_title(f"Precision-recall at IoU {iou}", fontsize=11)
    _finish_curve_axes(figure, axes, "recall", "precision", bool(keep.any()))
    return figure


def plot_f1_curve(curves: DetectionCurves, path: str | Path) -> Path:
    """F1 vs confidence threshold per class (thin) and averaged (thick), with the best threshold marked.

    Args:
        curves: from :func:`dfine.evaluation.curves.detection_curves`; classes without ground truth are
            left out.
        path: where the PNG goes (e.g. ``output_dir / "f1_curve.png"``); parent folders are created.

    Returns:
        ``path`` as a Path.

    Raises:
        ImportError: matplotlib is not installed.
    """
    return _save(_f1_figure(curves), path)


def _f1_figure(curves: DetectionCurves) -> Figure:
    figure = _new_figure(CURVE_FIGURE_SIZE)
    axes = figure.subplots()
    keep = curves.has_ground_truth
    labels = [name for name, k in zip(curves.category_names, keep, strict=True) if k]
    _draw_classes(axes, curves.confidence_grid, curves.f1[keep], labels)
    best_f1, best_threshold = curves.best_f1, curves.best_threshold
    axes.plot(curves.confidence_grid, curves.mean_f1, linewidth=3, color="tab:blue", label="all classes")
    axes.axvline(
        best_threshold, color="tab:red", linestyle="--", linewidth=1.5, label=f"best {best_threshold:.2f}"
    )
    axes.plot([best_threshold], [best_f1], marker="o", color="tab:red")
    axes.set_title(
        f"F1 vs confidence at IoU {curves.iou_threshold:g}: "
        f"best F1 {best_f1:.3f} at confidence {best_threshold:.2f}",
        fontsize=11,
    )
    _finish_curve_axes(figure, axes, "confidence threshold", "F1", bool(keep.any()))
    return figure
