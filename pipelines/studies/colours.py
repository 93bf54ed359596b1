"""``vlmlab study colours run``: colour-patch x concept similarity matrices over models x prompt styles.

``vlmlab study colours run --models SPEC... --styles 1 2 3 4 control --out DIR [--ratings FILE |
--concepts FILE] [--palette uw71|FILE] [--styles-file FILE]`` (or ``python -m
pipelines.studies.colours ...``, e.g. under ``ray job submit --working-dir . --``) connects to the
Ray cluster at ``--address`` / ``RAY_ADDRESS`` or starts an embedded local Ray.

Each (model, style) cell is one task on the model's actor (:mod:`pipelines.studies.cells`): the
actor loads the model once, embeds the palette's uniform patches once, and per style embeds the
concepts' prompts and writes ``DIR/scores/<model>/<style>.csv`` (first column the concept, then
colours 1..N; cosine similarities, or the expected strength for a graded style). The driver also
writes ``DIR/patches/NN.png`` (224x224 sRGB), ``DIR/palette.csv`` (CIELAB, sRGB, gamut clipping
per colour) and ``DIR/study.json`` (palette, concepts, style templates, model specs). A re-run
skips finished cells; a re-run with other concepts, palette or style templates into the same DIR
is refused rather than mixing matrices that do not compare.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.studies.cells import (
    ActorOptions,
    Cell,
    RunSummary,
    StudyError,
    check_specs,
    merge_manifest,
    model_folders,
    run_cells,
    write_manifest,
)
from vlmlab.config import add_config_arguments, config_from_args
from vlmlab.palette import PATCH_SIZE, Palette, PaletteError, load_palette
from vlmlab.runtime import start_ray
from vlmlab.studies.scores import read_matrix, style_scores, write_matrix
from vlmlab.studies.styles import (
    ALL_STYLES,
    DEFAULT_CATEGORIES,
    PromptStyle,
    StyleError,
    load_styles_file,
    read_concepts,
    resolve_styles,
)

log = logging.getLogger("vlmlab.study")
MANIFEST = "study.json"


@dataclass(frozen=True)
class ColourStudyConfig:
    """Options of ``vlmlab study colours run``."""

    models: tuple[str, ...] = field(default=(), metadata={
        "help": "model specs: open_clip:NAME/TAG, hf:ID or local directories"})
    styles: tuple[str, ...] = field(default=ALL_STYLES, metadata={
        "help": "prompt styles: 1 2 3 4 control control-COLOUR, names from --styles-file, or all"})
    out: str = field(default="", metadata={"help": "study folder (created or resumed)"})
    ratings: str | None = field(default=None, metadata={"help": "ratings CSV whose first column lists the concepts"})
    concepts: str | None = field(default=None, metadata={
        "help": "concepts file (CSV concept[,category] or one per line); default: the lab's 20 concepts"})
    palette: str = field(default="uw71", metadata={"help": "uw71 or a CSV of CIELAB L,a,b rows in palette order"})
    styles_file: str | None = field(default=None, metadata={"help": "YAML file of user prompt styles"})
    names: tuple[str, ...] = field(default=(), metadata={"help": "output folder name per model (default: from spec)"})
    actors_per_model: int = field(default=1, metadata={"help": "actors sharing one model's cells (each loads it)"})
    gpus_per_actor: float = field(default=0.25, metadata={"help": "GPU share per model actor when GPUs exist"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs per model actor (its torch threads on CPU)"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS or local)"})


@dataclass(frozen=True)
class ColourScoring:
    """The per-model work of the colour study (runs on the model actors)."""

    concepts: tuple[str, ...]
    styles: dict[str, PromptStyle]
    rgb8: np.ndarray  # (N, 3) uint8 patch colours in palette order

    def prepare(self, encoder: Any, cell: Cell) -> np.ndarray:
        """Image embeddings (N, D) of the uniform patches, computed once per actor."""
        from PIL import Image

        patches = [Image.new("RGB", (PATCH_SIZE, PATCH_SIZE), tuple(int(v) for v in c)) for c in self.rgb8]
        return encoder.encode_images(patches)

    def compute(self, encoder: Any, state: np.ndarray, cell: Cell) -> np.ndarray:
        """The (concepts, N) score matrix of one style."""
        return style_scores(encoder, state, list(self.concepts), self.styles[cell.key])

    def save(self, cell: Cell, result: np.ndarray) -> None:
        """Write the cell's CSV (atomically; its presence marks the cell done)."""
        write_matrix(cell.done, list(self.concepts), result)


def study_concepts(cfg: ColourStudyConfig) -> list[str]:
    """The concepts: from ``--concepts``, else the ratings' first column, else the lab's 20."""
    if cfg.concepts and cfg.ratings:
        raise StudyError("give --concepts or --ratings, not both (the ratings' first column lists the concepts)")
    if cfg.concepts:
        return list(read_concepts(cfg.concepts))
    if cfg.ratings:
        return read_matrix(cfg.ratings).concepts
    return list(DEFAULT_CATEGORIES)


def _palette_rows(palette: Palette) -> str:
    lines = ["colour,L,a,b,R,G,B,clipped,clip_excess,delta_e"]
    for c in palette.rendered():
        lines.append(f"{c.index},{c.lab[0]:g},{c.lab[1]:g},{c.lab[2]:g},{c.rgb[0]},{c.rgb[1]},{c.rgb[2]},"
                     f"{int(c.clipped)},{c.clip_excess:.4g},{c.delta_e:.4g}")
    return "\n".join(lines) + "\n"


def run_colour_study(cfg: ColourStudyConfig) -> RunSummary:
    """Compute every missing (model, style) score matrix of the study in ``cfg.out``; see the module doc."""
    if not cfg.models:
        raise StudyError("--models is required (one or more model specs)")
    if not cfg.out:
        raise StudyError("--out DIR is required")
    check_specs(cfg.models)
    user = load_styles_file(cfg.styles_file) if cfg.styles_file else {}
    styles = {s.name: s for s in resolve_styles(cfg.styles, user)}
    concepts = study_concepts(cfg)
    palette = load_palette(cfg.palette)
    folders = model_folders(cfg.models, cfg.names)
    out = Path(cfg.out)
    record = {"palette": palette.name, "palette_lab": palette.lab.round(6).tolist(), "concepts": concepts,
              "styles": {name: s.describe() for name, s in styles.items()},
              "models": {folder: spec for spec, folder in folders.items()}}
    manifest = merge_manifest(out / MANIFEST, record, fixed=("palette_lab", "concepts"), named=("styles", "models"))
    write_manifest(out / MANIFEST, manifest)
    _write_palette(out, palette)

    cells = [Cell(spec, folder, name, str(out / "scores" / folder / f"{name}.csv"))
             for spec, folder in folders.items() for name in styles]
    task = ColourScoring(tuple(concepts), styles, palette.rgb8())
    if any(not Path(c.done).exists() for c in cells):
        start_ray(cfg.address)
    summary = run_cells(cells, task, ActorOptions(cfg.actors_per_model, cfg.gpus_per_actor, cfg.cpus_per_actor))
    return summary


def _write_palette(out: Path, palette: Palette) -> None:
    table = out / "palette.csv"
    if not table.is_file():
        table.write_text(_palette_rows(palette))
    patches = out / "patches"
    patches.mkdir(exist_ok=True)
    width = len(str(len(palette)))
    for k, image in enumerate(palette.patches(), start=1):
        path = patches / f"{k:0{width}d}.png"
        if not path.is_file():
            image.save(path)
    clipped = palette.clipped()
    if clipped:
        worst = max(clipped, key=lambda c: c.delta_e)
        log.warning("palette %s: %d of %d colours lie outside the sRGB gamut and are shown clipped (largest shift "
                    "ΔE %.1f, colour %d); see %s", palette.name, len(clipped), len(palette), worst.delta_e,
                    worst.index, table)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab study colours run --models SPEC... --styles 1 2 3 4 control --out DIR [options]``."""
    parser = argparse.ArgumentParser(prog="vlmlab study colours run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file with any of the options below")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    add_config_arguments(parser, ColourStudyConfig)
    args = parser.parse_args(argv)
    cfg = config_from_args(ColourStudyConfig, args, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        palette = load_palette(cfg.palette)
        summary = run_colour_study(cfg)
    except (StudyError, StyleError, PaletteError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"vlmlab study colours run: {exc}") from exc
    print(summary.line())
    clipped = palette.clipped()
    print(f"palette {palette.name}: {len(palette)} colours, {len(clipped)} outside the sRGB gamut (clipped)"
          + "".join(f"\n  colour {c.index} Lab {c.lab} -> sRGB {c.rgb}, ΔE {c.delta_e:.1f}" for c in clipped))
    print(f"scores in {Path(cfg.out) / 'scores'}; next: vlmlab study colours analyze --scores {cfg.out} "
          f"--ratings RATINGS.csv --out {Path(cfg.out) / 'analysis'}")
    if summary.failed:
        raise SystemExit("failed cells:\n" + "\n".join(f"  {c.folder} / {c.key}: {why}" for c, why in summary.failed))


if __name__ == "__main__":
    main()

