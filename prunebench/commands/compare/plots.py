"""PNG figures for ``prunebench compare`` (matplotlib, Agg; no pyplot, so no global state or display).

Four figures explain a comparison:

* :func:`plot_tradeoff` -- test top-1 against achieved MACs, one line per method across targets, error
  bars = sample standard deviation over seeds, the dense model (star, dotted line) and the dense model
  trained for the same extra epochs (diamond, dashed line) as references;
* :func:`plot_layer_channels` -- remaining output channels per layer at one target, averaged over seeds,
  against the dense widths: *where* each method prunes (the figure pruning papers show);
* :func:`plot_sparsity_norms` -- per regularized method, its channels' group norms (relative to the layer's
  median at the start of sparsity training) sorted, at the start and the end of that stage: how many
  channels the regularizer actually drove toward zero;
* :func:`plot_training_curves` -- per cell, the per-epoch training loss, penalty, validation top-1 and
  learning rate with seeds overlaid and the sparsity/fine-tune stages shaded.

Every function takes the tidy frames built in :mod:`prunebench.commands.compare` (the table of
:mod:`~prunebench.commands.compare.statistics`, the long frames of
:mod:`~prunebench.commands.compare.artifacts`) and returns the paths it wrote; each PNG is written
atomically. What the figures show and why: docs/fairness.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from prunebench.files import atomic_write
from prunebench.sparsity import ZERO_THRESHOLD  # a channel below 5% of its layer's starting median norm

CURVE_PANELS = {  # panel title -> (metric, line style, scale for display); a panel shows what was logged
    "training loss": [("train_loss", "-", 1.0)],
    "sparsity penalty": [("train_penalty", "-", 1.0)],
    "top-1 (%): validation, training dashed": [("val_top1", "-", 100.0), ("train_top1", "--", 100.0)],
    "learning rate": [("lr", "-", 1.0)],
}
STAGE_COLORS = ("#fde8c8", "#d6ecfa", "#e3f5d8", "#efe0f5")
DPI = 120
NORM_FLOOR = 1e-4  # exact zeros cannot sit on a log axis: smaller norms are drawn at this value


def _figure(width: float, height: float) -> Figure:
    """A figure on an Agg canvas: rendering never depends on the user's backend or a display."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    # bbox "tight": long rotated layer names must not be clipped
    atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))
    return path


def method_colors(labels: Iterable[str]) -> dict[str, str]:
    """A stable colour per method label (sorted order), so one method looks the same in every figure."""
    palette = [f"C{i}" for i in range(10)]
    return {label: palette[i % len(palette)] for i, label in enumerate(sorted(set(labels)))}


def slug(text: str) -> str:
    """A file-name-safe version of a method label such as ``oicsr(lambda=0.001)``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _model_dataset_axes(fig: Figure, keys: list[tuple[str, str]], vertical: bool) -> dict[tuple[str, str], Axes]:
    axes = fig.subplots(len(keys), 1, squeeze=False) if vertical else fig.subplots(1, len(keys), squeeze=False)
    return dict(zip(keys, axes.ravel(), strict=True))


def plot_tradeoff(table: pd.DataFrame, path: Path) -> Path:
    """Test top-1 (mean ± sd over seeds) against achieved MACs, one panel per (model, dataset).

    ``table`` is :func:`prunebench.commands.compare.statistics.aggregate`'s output. Each method is one line
    through its targets (sorted by MACs) so several targets read as a trade-off curve; points are labelled
    with their target.
    """
    keys = list(table.groupby(["model", "dataset"], sort=True).groups)
    fig = _figure(6.4 * len(keys), 4.6)
    axes = _model_dataset_axes(fig, keys, vertical=False)
    pruned = table[table["kind"] == "pruned"]
    colors = method_colors(pruned["method_label"])
    for (model, dataset), ax in axes.items():
        here = table[(table["model"] == model) & (table["dataset"] == dataset)]
        for label, rows in here[here["kind"] == "pruned"].groupby("method_label", sort=True):
            rows = rows.sort_values("macs_M")
            ax.errorbar(
                rows["macs_M"],
                rows["top1_pct"],
                yerr=rows["top1_pct_std"].fillna(0.0),
                marker="o",
                capsize=3,
                color=colors[label],
                label=label,
            )
            for x, y, t in zip(rows["macs_M"], rows["top1_pct"], rows["target"], strict=True):
                ax.annotate(
                    f"{t:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colors[label]
                )
        _reference(ax, here[here["kind"] == "dense"], "*", 12, ":", "black")
        _reference(ax, here[here["kind"] == "control"], "D", 7, "--", "0.35")
        ax.set_xlabel("MACs (M, fvcore; achieved)")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{model} on {dataset}: accuracy vs compute (mean ± sd over seeds)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _reference(ax: Axes, rows: pd.DataFrame, marker: str, size: float, style: str, color: str) -> None:
    """An unpruned reference row (dense, dense control) as a marker at its MACs and a horizontal line."""
    if not len(rows) or pd.isna(rows["top1_pct"].iloc[0]):
        return
    r = rows.iloc[0]
    ax.axhline(r["top1_pct"], color="0.4", linestyle=style, linewidth=1)
    ax.errorbar(
        [r["macs_M"]],
        [r["top1_pct"]],
        yerr=[0.0 if pd.isna(r["top1_pct_std"]) else r["top1_pct_std"]],
        marker=marker,
        markersize=size,
        color=color,
        linestyle="none",
        capsize=3,
        label=r["method_label"],
    )


def _layer_means(layers: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Remaining channels per (method label, layer), averaged over seeds, and the dense widths.

    Only convolutions are shown when the ``type`` column says which rows are convolutions: those are the
    layers whose channels a structured method removes; the classifier keeps its outputs.
    """
    if "type" in layers:
        conv = layers[layers["type"].astype(str).str.contains("conv", case=False)]
        layers = conv if len(conv) else layers
    order = layers.groupby("layer", sort=False)["order"].min().sort_values()
    dense = layers.groupby("layer", sort=False)["out_before"].first().reindex(order.index)
    remaining = layers.pivot_table(index="layer", columns="method_label", values="out_after", aggfunc="mean")
    return remaining.reindex(order.index), dense


def plot_layer_channels(layers: pd.DataFrame, target: float, path: Path) -> Path:
    """Remaining output channels per layer at ``target``: dense widths as bars, each method as a line.

    ``layers`` stacks the cells' ``layers.csv`` artifacts (columns layer, type, out_before, out_after, the
    cell keys and ``order``, the row's position in its file); one panel per (model, dataset).
    """
    keys = list(layers.groupby(["model", "dataset"], sort=True).groups)
    widest = int(layers.groupby(["model", "dataset"])["layer"].nunique().max())
    fig = _figure(max(6.4, 0.22 * widest + 2.5), 4.2 * len(keys))
    axes = _model_dataset_axes(fig, keys, vertical=True)
    colors = method_colors(layers["method_label"])
    for (model, dataset), ax in axes.items():
        here = layers[(layers["model"] == model) & (layers["dataset"] == dataset)]
        remaining, dense = _layer_means(here)
        x = range(len(remaining))
        ax.bar(x, dense.to_numpy(), color="0.85", label="dense", width=0.8)
        for label in remaining.columns:
            ax.plot(
                x,
                remaining[label].to_numpy(),
                marker="o",
                markersize=3,
                linewidth=1.2,
                color=colors[label],
                label=label,
            )
        ax.set_xticks(list(x), list(remaining.index), rotation=90, fontsize=max(5, min(8, int(400 / max(1, len(x))))))
        ax.set_ylabel("output channels")
        ax.set_title(
            f"{model} on {dataset}: remaining channels per layer at target {target:g} (mean over seeds)", fontsize=10
        )
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_sparsity_norms(norms: pd.DataFrame, target: float, path: Path) -> Path:
    """Sorted normalized channel norms at the start (dashed) and end (solid) of sparsity training, log scale.

    ``norms`` is :func:`prunebench.commands.compare.artifacts.load_norms`'s long frame (cell keys, stage,
    rank, value): one seed per method. One panel per (model, dataset), a line pair per method and the zero
    threshold as a line.
    """
    keys = list(norms.groupby(["model", "dataset"], sort=True).groups)
    fig = _figure(7.2, 4.4 * len(keys))
    axes = _model_dataset_axes(fig, keys, vertical=True)
    colors = method_colors(norms["method_label"])
    floored = bool((norms["value"] < NORM_FLOOR).any())
    for (model, dataset), ax in axes.items():
        here = norms[(norms["model"] == model) & (norms["dataset"] == dataset)]
        for (label, seed), rows in here.groupby(["method_label", "seed"], sort=True):
            for stage, style in (("start", "--"), ("end", "-")):
                line = rows[rows["stage"] == stage].sort_values("rank")
                ax.plot(
                    line["rank"],
                    np.maximum(line["value"], NORM_FLOOR),
                    linestyle=style,
                    linewidth=1.3,
                    color=colors[label],
                    label=f"{label} (seed {seed})" if stage == "end" else None,
                )
        ax.axhline(ZERO_THRESHOLD, color="0.3", linestyle=":", linewidth=1)
        ax.text(
            0.01,
            ZERO_THRESHOLD,
            f"zero threshold ({ZERO_THRESHOLD:g})",
            transform=ax.get_yaxis_transform(),
            va="bottom",
            fontsize=7,
            color="0.3",
        )
        ax.set_yscale("log")
        ax.set_xlabel("regularized channels, sorted by norm")
        ax.set_ylabel("group norm / layer median at start")
        floor = f"; norms below {NORM_FLOOR:g} drawn at {NORM_FLOOR:g}" if floored else ""
        ax.set_title(
            f"{model} on {dataset}: sorted channel norms at target {target:g}, start (dashed) and end "
            f"(solid) of sparsity training{floor}",
            fontsize=9,
        )
        ax.grid(True, which="both", alpha=0.25)
        styles = [
            Line2D([], [], color="0.3", linestyle="--", label="start"),
            Line2D([], [], color="0.3", linestyle="-", label="end"),
        ]
        ax.legend(handles=[*ax.get_legend_handles_labels()[0], *styles], fontsize=8)
    return _save(fig, path)


def _shade_stages(ax: Axes, stages: dict[str, list[int]], label: bool) -> None:
    """Shade each stage's step range [start, end) so the pruning point between stages is visible."""
    for i, (name, (start, end)) in enumerate(stages.items()):
        ax.axvspan(
            start - 0.5,
            end - 0.5,
            color=STAGE_COLORS[i % len(STAGE_COLORS)],
            alpha=0.6,
            zorder=0,
            label=name if label else None,
        )


def plot_training_curves(history: pd.DataFrame, stages: dict[str, list[int]], out_dir: Path) -> list[Path]:
    """One figure per (model, dataset, method label, target): per-epoch metrics with seeds overlaid.

    ``history`` is long-form (cell keys, metric, step, value). Panels appear for the metrics present;
    top-1 is shown in percent. Files are ``<method>_t<target>.png``, or ``<method>.png`` for runs without a
    target (the dense control), prefixed with model and dataset when the selection spans several.
    """
    written: list[Path] = []
    several = history[["model", "dataset"]].drop_duplicates().shape[0] > 1
    seeds = sorted(history["seed"].unique())
    for (model, dataset, label, target), cell in history.groupby(
        ["model", "dataset", "method_label", "target"], dropna=False
    ):
        logged = set(cell["metric"])
        panels = {t: [c for c in curves if c[0] in logged] for t, curves in CURVE_PANELS.items()}
        panels = {t: curves for t, curves in panels.items() if curves}
        fig = _figure(3.4 * len(panels), 3.2)
        axes = fig.subplots(1, len(panels), squeeze=False).ravel()
        for j, (ax, (name, curves)) in enumerate(zip(axes, panels.items(), strict=True)):
            _shade_stages(ax, stages, label=j == 0)
            for metric, style, scale in curves:
                for seed, curve in cell[cell["metric"] == metric].groupby("seed", sort=True):
                    curve = curve.sort_values("step")
                    ax.plot(
                        curve["step"],
                        curve["value"] * scale,
                        linestyle=style,
                        marker=".",
                        color=f"C{seeds.index(seed) % 10}",
                        label=f"seed {seed}" if style == "-" else None,
                    )
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            lr = cell.loc[cell["metric"] == "lr", "value"]
            if curves[0][0] == "lr" and (lr > 0).all() and lr.max() > 10 * lr.min():  # schedules span decades
                ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        at = f" at target {target:g}" if math.isfinite(target) else ""
        fig.suptitle(f"{label}{at} ({model} on {dataset})", fontsize=10)
        prefix = f"{slug(model)}_{slug(dataset)}_" if several else ""
        suffix = f"_t{target:g}" if math.isfinite(target) else ""
        written.append(_save(fig, out_dir / f"{prefix}{slug(label)}{suffix}.png"))
    return written
