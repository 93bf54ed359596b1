"""Figures of the studies (PNG, matplotlib's Agg backend): heatmaps over models x styles, rankings,
per-concept bars, palettes coloured by association, ΔS scatter and capacity bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    _plt().close(fig)
    return path


def heatmap(table: pd.DataFrame, rows: str, columns: str, value: str, path: str | Path, title: str,
            vmin: float | None = None, vmax: float | None = None, cmap: str = "viridis") -> Path:
    """A rows x columns heatmap of ``value`` (one cell per row of ``table``), numbers written in."""
    plt = _plt()
    grid = table.pivot_table(index=rows, columns=columns, values=value, aggfunc="mean", sort=False)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * grid.shape[1] + 3), max(2.5, 0.55 * grid.shape[0] + 1.8)))
    im = ax.imshow(grid.to_numpy(dtype=float), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index])
    ax.set_xlabel(columns)
    ax.set_ylabel(rows)
    ax.set_title(title)
    values = grid.to_numpy(dtype=float)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = values[i, j]
            if np.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))  # dark text on light cells, light on dark
                ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return _save(fig, path)


def ranking(summary: pd.DataFrame, path: str | Path, value: str = "pearson") -> Path:
    """Model x style cells ranked by their mean ``value`` over concepts, with ±1 standard error."""
    plt = _plt()
    cells = summary[summary["category"] == "all"].sort_values(value, ascending=True)
    labels = [f"{m} / {s}" for m, s in zip(cells["model"], cells["style"])]
    sem = cells[f"{value}_sd"] / np.sqrt(cells["n_concepts"]) if f"{value}_sd" in cells else None
    models = list(dict.fromkeys(cells["model"]))
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(cells) + 1.2)))
    ax.barh(range(len(cells)), cells[value], xerr=sem, color=[colours(models.index(m) % 10) for m in cells["model"]])
    ax.set_yticks(range(len(cells)), labels)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"mean {value} over concepts (model vs human)")
    ax.set_title("cells ranked by fit")
    fig.tight_layout()
    return _save(fig, path)


def concept_bars(metrics: pd.DataFrame, model: str, path: str | Path, value: str = "pearson") -> Path:
    """Per-concept ``value`` of one model, one bar per style, concepts grouped by category."""
    plt = _plt()
    data = metrics[metrics["model"] == model].sort_values(["category", "concept"])
    concepts = list(dict.fromkeys(data["concept"]))
    styles = list(dict.fromkeys(metrics["style"]))
    width = 0.8 / max(1, len(styles))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(concepts) * max(1, len(styles)) ** 0.5 + 2), 4))
    for k, style in enumerate(styles):
        rows = data[data["style"] == style].set_index("concept")
        heights = [rows[value].get(c, np.nan) for c in concepts]
        ax.bar(np.arange(len(concepts)) + (k - (len(styles) - 1) / 2) * width, heights, width, label=f"style {style}")
    ax.set_xticks(range(len(concepts)), concepts, rotation=60, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel(value)
    ax.set_title(f"{model}: {value} per concept")
    ax.legend(fontsize=7, ncol=min(len(styles), 6))
    fig.tight_layout()
    return _save(fig, path)


def association_palettes(concepts: Sequence[str], human: np.ndarray, model: np.ndarray, rgb8: np.ndarray,
                         path: str | Path, title: str) -> Path:
    """For each concept, the palette as bars coloured by the colours themselves: human association
    upwards, the model's downwards (both as distributions over colours), colours sorted by the
    human association. A model that fits mirrors the human profile."""
    plt = _plt()
    from vlmlab.studies.association import to_distribution

    n = len(concepts)
    cols = min(5, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
    colours = rgb8 / 255.0
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        p_h, p_m = to_distribution(human[k]), to_distribution(model[k])
        order = np.argsort(-human[k], kind="stable")
        x = np.arange(len(order))
        ax.bar(x, p_h[order], 1.0, color=colours[order], edgecolor="none")
        ax.bar(x, -p_m[order], 1.0, color=colours[order], edgecolor="none")
        ax.axhline(0, color="black", lw=0.6)
        top = max(p_h.max(), p_m.max()) * 1.05 or 1
        ax.set_ylim(-top, top)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("#f4f4f4")
        ax.set_title(concepts[k], fontsize=9)
    axes[0, 0].set_ylabel("human ↑  model ↓", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def palette_swatches(rgb8: np.ndarray, clipped: Sequence[bool], path: str | Path, title: str) -> Path:
    """The palette as numbered swatches; colours rendered clipped to the sRGB gamut are marked ✕."""
    plt = _plt()
    n = len(rgb8)
    cols = 12
    rows = int(np.ceil(n / cols))
    fig, ax = plt.subplots(figsize=(cols * 0.6, rows * 0.6 + 0.5))
    for k in range(n):
        r, c = divmod(k, cols)
        ax.add_patch(plt.Rectangle((c, -r), 0.95, 0.95, color=rgb8[k] / 255.0))
        light = rgb8[k].astype(float) @ [0.299, 0.587, 0.114] > 140
        ax.text(c + 0.47, -r + 0.47, f"{k + 1}{' ✕' if clipped[k] else ''}", ha="center", va="center", fontsize=7,
                color="black" if light else "white")
    ax.set_xlim(0, cols)
    ax.set_ylim(-rows + 1, 1)
    ax.axis("off")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def delta_s_scatter(panels: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """One hexbin panel per cell: ΔS from human associations (x) vs from the model (y) over every
    colour pair and concept pair, with their Pearson r."""
    plt = _plt()
    n = len(panels)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        label, human, model = panels[k]
        ax.hexbin(human, model, gridsize=30, bins="log", cmap="magma_r", extent=(0, 1, 0, 1))
        r = np.corrcoef(human, model)[0, 1] if np.ptp(human) and np.ptp(model) else np.nan
        ax.set_title(f"{label}\nr = {r:.2f}", fontsize=8)
        ax.set_xlabel("ΔS human", fontsize=8)
        ax.set_ylabel("ΔS model", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def capacity_bars(table: pd.DataFrame, path: str | Path) -> Path:
    """Capacity of each concept set (categories and all): the human-chosen palette, and each cell's
    model-chosen palette, both judged by human ΔS."""
    plt = _plt()
    data = table[table["kind"] != "pair"]
    sets = list(dict.fromkeys(data["concept_set"]))
    cells = list(dict.fromkeys(zip(data["model"], data["style"])))
    width = 0.8 / (len(cells) + 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.3 * len(sets) * (len(cells) + 1) ** 0.5 + 2)),
                                    4.5 + 0.2 * len(cells) / 4))
    human = data.drop_duplicates("concept_set").set_index("concept_set")["capacity_human"]
    ax.bar(np.arange(len(sets)) - 0.4 + width / 2, [human[s] for s in sets], width, color="black",
           label="human palette")
    colours = plt.get_cmap("tab20")
    for k, (model, style) in enumerate(cells):
        rows = data[(data["model"] == model) & (data["style"] == style)].set_index("concept_set")
        ax.bar(np.arange(len(sets)) - 0.4 + width * (k + 1.5), [rows["capacity_model_palette_human"].get(s, np.nan)
               for s in sets], width, color=colours(k % 20), label=f"{model} / {style}")
    ax.set_xticks(range(len(sets)), sets)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean ΔS (human associations)")
    ax.set_title("capacity: best palette by humans vs palette chosen by each model")
    ax.legend(fontsize=7, ncol=min(4, len(cells) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return _save(fig, path)
