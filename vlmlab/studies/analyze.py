"""``vlmlab study colours analyze``: model-vs-human fit of colour-concept association scores.

Reads only score matrices (``DIR/scores/<model>/<style>.csv`` as ``vlmlab study colours run``
writes them, a folder of ``<style>.csv`` files, or one CSV) and a human ratings file in the same
layout, so scores computed elsewhere can be analysed too. Writes ``OUT/metrics.csv`` (one row per
model x style x concept; see :mod:`vlmlab.studies.association`), ``OUT/summary.csv`` (by model x
style x category), ``OUT/discriminability.csv`` (see :mod:`vlmlab.studies.discriminability`),
figures under ``OUT/figures/`` and ``OUT/report.html``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.palette import Palette, PaletteError, load_palette
from vlmlab.report import Report
from vlmlab.studies import figures
from vlmlab.studies.association import METRIC_COLUMNS, metrics_table, summarise
from vlmlab.studies.discriminability import MERITS, discriminability_table, pair_distances, rescale_unit
from vlmlab.studies.scores import ScoreMatrix, read_matrix
from vlmlab.studies.styles import ALL_STYLES, default_category, read_concepts

log = logging.getLogger("vlmlab.study")
PALETTE_TABLE = "palette.csv"
SCORES_DIR = "scores"
STUDY_MANIFEST = "study.json"


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options of ``vlmlab study colours analyze``."""

    scores: str = field(default="", metadata={"help": "study folder (holding scores/), a scores folder, or one CSV"})
    ratings: str = field(default="", metadata={"help": "human ratings CSV: concept, then one column per colour"})
    out: str = field(default="", metadata={"help": "folder for metrics.csv, summary.csv, figures and report.html"})
    concreteness: str | None = field(default=None, metadata={
        "help": "optional CSV concept,concreteness: per-concept fit is also correlated with it"})
    concepts: str | None = field(default=None, metadata={
        "help": "optional CSV concept,category for grouping (default: the lab's categories, else 'other')"})
    palette: str | None = field(default=None, metadata={
        "help": "uw71 or a CSV of L,a,b rows (default: the study's palette.csv, else uw71)"})
    model_name: str = field(default="", metadata={"help": "model column for a single scores CSV"})
    style: str = field(default="", metadata={"help": "style column for a single scores CSV (default: its name)"})
    merit: str = field(default="contrast", metadata={
        "help": "assignment merit for capacity: contrast (association minus the others') or association"})


@dataclass(frozen=True)
class Cell:
    """One score matrix: its model, its style and its file."""

    model: str
    style: str
    path: Path


def _style_key(style: str) -> tuple[int, str]:
    return (ALL_STYLES.index(style), "") if style in ALL_STYLES else (len(ALL_STYLES), style)


def find_cells(scores: str | Path, model_name: str = "", style: str = "") -> list[Cell]:
    """Score matrices under ``scores`` (see the module doc), models in order, styles 1-4, control, others."""
    path = Path(scores)
    if path.is_file():
        return [Cell(model_name, style or path.stem, path)]
    if not path.is_dir():
        raise FileNotFoundError(f"no scores at {path}: pass a study folder, a scores folder or a CSV")
    base = path / SCORES_DIR if (path / SCORES_DIR).is_dir() else path
    cells = [Cell(p.parent.name, p.stem, p) for p in base.glob("*/*.csv")]
    if not cells:
        cells = [Cell(model_name, p.stem, p) for p in base.glob("*.csv") if p.name != PALETTE_TABLE]
    if not cells:
        raise FileNotFoundError(f"no score CSVs under {base} (expected <model>/<style>.csv or <style>.csv)")
    return sorted(cells, key=lambda c: (c.model, _style_key(c.style)))


def study_palette(scores: str | Path, name: str | None) -> tuple[Palette, list[bool]]:
    """The palette the scores were made on and which colours were clipped: ``name`` when given,
    else the study's ``palette.csv``, else ``uw71``."""
    root = Path(scores)
    table = root / PALETTE_TABLE if root.is_dir() else None
    if name is None and table is not None and table.is_file():
        import json

        frame = pd.read_csv(table)
        manifest = root / STUDY_MANIFEST
        label = json.loads(manifest.read_text()).get("palette", root.name) if manifest.is_file() else root.name
        palette = Palette(str(label), frame[["L", "a", "b"]].to_numpy(float))
        return palette, frame["clipped"].astype(bool).tolist()
    palette = load_palette(name or "uw71")
    return palette, [c.clipped for c in palette.rendered()]


def _covariate(path: str | None) -> dict[str, float]:
    if not path:
        return {}
    frame = pd.read_csv(path)
    if frame.shape[1] < 2:
        raise ValueError(f"{path}: expected columns concept,value")
    return {str(c).strip().lower(): float(v) for c, v in zip(frame.iloc[:, 0], frame.iloc[:, 1])}


def analyze(cfg: AnalyzeConfig) -> dict[str, Path]:
    """Run the analysis; returns the paths written (``metrics``, ``summary``, ``discriminability``, ``report``)."""
    if cfg.merit not in MERITS:
        raise ValueError(f"--merit {cfg.merit!r}: expected one of {', '.join(MERITS)}")
    cells = find_cells(cfg.scores, cfg.model_name, cfg.style)
    ratings = read_matrix(cfg.ratings)
    palette, clipped = study_palette(cfg.scores, cfg.palette)
    if len(palette) != ratings.colours:
        raise ValueError(f"the ratings have {ratings.colours} colours, the palette {palette.name} {len(palette)}")
    categories = {c.lower(): cat for c, cat in read_concepts(cfg.concepts).items()} if cfg.concepts else {}
    for concept in ratings.concepts:
        categories.setdefault(concept.lower(), default_category(concept))
    concreteness = _covariate(cfg.concreteness)
    out = Path(cfg.out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    metric_frames, disc_frames, matrices, panels = [], [], {}, []
    for cell in cells:
        scores = read_matrix(cell.path)
        frame = metrics_table(cell.model, cell.style, scores, ratings, categories, palette.lab)
        missing = sorted({c.lower() for c in scores.concepts} - {c.lower() for c in ratings.concepts})
        if missing:
            log.warning("%s: no ratings for %s", cell.path, ", ".join(missing))
        if frame.empty:
            raise ValueError(f"{cell.path} shares no concept with {cfg.ratings}")
        if concreteness:
            frame["concreteness"] = [concreteness.get(c.lower(), np.nan) for c in frame["concept"]]
        metric_frames.append(frame)
        disc = discriminability_table(cell.model, cell.style, scores, ratings, categories, cfg.merit)
        disc_frames.append(disc)
        matrices[(cell.model, cell.style)] = scores
        panels.append((f"{cell.model} / {cell.style}", *_all_pair_distances(scores, ratings)))

    metrics = pd.concat(metric_frames, ignore_index=True)
    summary = summarise(metrics, ["concreteness"] if concreteness else [])
    disc = pd.concat(disc_frames, ignore_index=True)
    paths = {name: out / f"{name}.csv" for name in ("metrics", "summary", "discriminability")}
    metrics.to_csv(paths["metrics"], index=False, float_format="%.6g")
    summary.to_csv(paths["summary"], index=False, float_format="%.6g")
    disc.to_csv(paths["discriminability"], index=False, float_format="%.6g")
    paths["report"] = _report(cfg, out, metrics, summary, disc, matrices, ratings, palette, clipped, panels)
    return paths


def _all_pair_distances(scores: ScoreMatrix, ratings: ScoreMatrix) -> tuple[np.ndarray, np.ndarray]:
    from vlmlab.studies.association import align

    shared = align(scores, ratings)
    human = ratings.values[[j for _, _, j in shared]]
    machine = rescale_unit(scores.values[[i for _, i, _ in shared]])
    pairs = [(a, b) for a in range(len(shared)) for b in range(a + 1, len(shared))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    return (np.concatenate([pair_distances(human, a, b) for a, b in pairs]),
            np.concatenate([pair_distances(machine, a, b) for a, b in pairs]))


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text) or "_"


def _report(cfg: AnalyzeConfig, out: Path, metrics: pd.DataFrame, summary: pd.DataFrame, disc: pd.DataFrame,
            matrices: dict[tuple[str, str], ScoreMatrix], ratings: ScoreMatrix, palette: Palette,
            clipped: list[bool], panels: list) -> Path:
    fig_dir = out / "figures"
    overall = summary[summary["category"] == "all"]
    models = list(dict.fromkeys(metrics["model"]))
    styles = list(dict.fromkeys(metrics["style"]))
    report = Report("Colour-concept associations: models vs humans", out)
    report.note(f"Scores: {cfg.scores}. Ratings: {cfg.ratings} ({len(ratings.concepts)} concepts x "
                f"{ratings.colours} colours). Palette: {palette.name}. {len(models)} model(s) x {len(styles)} "
                f"style(s); {metrics['concept'].nunique()} concepts with both scores and ratings.")
    report.note("Pearson and Spearman compare the model's scores with the ratings over the palette colours. "
                "TV (total variation, 1/2 L1), EMD (earth mover's distance over palette positions) and EMD-Lab "
                "(over CIELAB, in ΔE units) compare the two as distributions over colours: each row is shifted to "
                "a minimum of 0 and divided by its sum, so the concept-dependent offset of cosine similarities "
                "does not count. Entropy difference = H(model) - H(human) in bits (positive: the model is "
                "flatter). The control style names a colour without the concept: its fit is a concept-blind "
                "baseline.")
    report.heading("Fit by model and style")
    report.figure(figures.heatmap(overall, "model", "style", "pearson", fig_dir / "heatmap_pearson.png",
                                  "mean Pearson r (model vs human) over concepts", -1, 1, "RdBu"),
                  "Mean Pearson correlation with the human associations, per model and prompt style.")
    report.figure(figures.ranking(summary, fig_dir / "ranking.png"), "Cells ranked by mean Pearson (±1 s.e.).")
    report.table(overall, ["model", "style", "n_concepts", "pearson", "spearman", "tv", "emd", "emd_lab",
                           "entropy_diff", "fit_entropy_spearman"])
    report.note("fit_entropy_spearman: rank correlation over concepts between a concept's fit (Pearson) and the "
                "entropy of its human distribution (negative: peaked human associations are fit better).")
    report.heading("By category")
    report.table(summary[summary["category"] != "all"], ["model", "style", "category", "n_concepts", "pearson",
                                                         "spearman", "tv", "emd", "entropy_diff"])
    report.heading("Per concept")
    for model in models:
        report.figure(figures.concept_bars(metrics, model, fig_dir / f"concepts_{_slug(model)}.png"),
                      f"{model}: Pearson r per concept and style.")
    report.heading("Palettes coloured by association")
    rgb8 = palette.rgb8()
    for (model, style), scores in matrices.items():
        from vlmlab.studies.association import align

        shared = align(scores, ratings)
        path = fig_dir / "associations" / _slug(model) / f"{_slug(style)}.png"
        figures.association_palettes([c for c, _, _ in shared], ratings.values[[j for _, _, j in shared]],
                                     scores.values[[i for _, i, _ in shared]], rgb8, path,
                                     f"{model} / style {style}: human (up) vs model (down)")
        report.figure(path, f"{model}, style {style}: each concept's association over the palette colours, sorted "
                            "by human association; bars are the colours themselves.")
    report.heading("Semantic discriminability")
    report.note("ΔS (Mukherjee et al. 2022) of every colour pair for every concept pair, from human associations and "
                "from the model's (min-max rescaled to [0, 1]). Capacity: colours assigned one per concept by the "
                "Hungarian algorithm, scored by the mean ΔS over the set's concept pairs; the model's palette is "
                "judged by human ΔS.")
    report.figure(figures.delta_s_scatter(panels, fig_dir / "discriminability.png"),
                  "ΔS from the model vs from humans, all colour pairs x concept pairs.")
    report.figure(figures.capacity_bars(disc, fig_dir / "capacity.png"),
                  "Capacity per concept set: human palette vs each model's palette, judged by humans.")
    report.table(disc[disc["kind"] != "pair"], ["model", "style", "concept_set", "n_concepts", "ds_pearson",
                                               "ds_spearman", "capacity_human", "capacity_model",
                                               "capacity_model_palette_human", "assignment_agreement"])
    report.heading("Palette")
    report.figure(figures.palette_swatches(rgb8, clipped, fig_dir / "palette.png",
                                           f"{palette.name}: {len(palette)} colours ({sum(clipped)} clipped ✕)"),
                  "The colours as rendered (sRGB); ✕ marks colours outside the sRGB gamut, shown clipped.")
    report.note("Files: metrics.csv (per concept), summary.csv (per category), discriminability.csv (per concept set).")
    return report.write()


def main(argv: list[str] | None = None) -> None:
    """``vlmlab study colours analyze --scores DIR_OR_CSV --ratings FILE --out OUT [--concreteness FILE]``."""
    parser = argparse.ArgumentParser(prog="vlmlab study colours analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with any of the options below")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, AnalyzeConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(AnalyzeConfig, args, args.config, args.overrides)
    for name in ("scores", "ratings", "out"):
        if not getattr(cfg, name):
            parser.error(f"--{name} is required")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = analyze(cfg)
    except (FileNotFoundError, ValueError, PaletteError) as exc:
        raise SystemExit(f"vlmlab study colours analyze: {exc}") from exc
    summary = pd.read_csv(paths["summary"])
    overall = summary[summary["category"] == "all"]
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(overall[["model", "style", "n_concepts", "pearson", "spearman", "tv", "emd", "entropy_diff"]]
              .to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()


__all__ = ["METRIC_COLUMNS", "AnalyzeConfig", "analyze", "find_cells", "main"]
