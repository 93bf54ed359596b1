"""Study throughput: cells/s of the colour study and of the zero-shot grid, one model actor vs several.

    python bench/study.py [--models tiny open_clip:ViT-B-32] [--actors 1 2] [--cells 16] [--tiles 144]

For each model, in one run on an embedded local Ray: the colour study (``pipelines.studies.colours``)
over ``--cells`` prompt styles (the five built-in ones plus variants of style 3) and the zero-shot
grid (``pipelines.studies.grid``) over ``--cells`` template sets on a store of ``--tiles`` sample
tiles, each computed from scratch once per ``--actors`` setting (actors sharing one model's cells,
each loading it; the machine's cores are split evenly between them, so every setting has the same
CPUs: one actor with all the cores vs several with a share each). It prints cells/s over the whole
run (actor start and model loading included: what a user waits for) and the ratio of each setting
to the first; one JSON line goes to bench/results.jsonl. ``open_clip:ViT-B-32`` without a
pretrained tag has random weights: one draw is saved to a local directory first, so that the store
and the actors hold the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results.jsonl"


def style_variants(n: int, path: Path) -> list[str]:
    """The built-in styles plus ``n - 5`` user styles (variants of style 3), written to ``path``."""
    import yaml

    extra = {f"v{k}": f"The color of the image is associated with the concept {{w}} (variant {k})."
             for k in range(max(0, n - 5))}
    path.write_text("# python bench/study.py\n" + yaml.safe_dump(extra))
    return ["1", "2", "3", "4", "control", *extra]


def template_variants(n: int, path: Path) -> list[str]:
    """The project's four template sets plus ``n - 4`` variants of ``rocks``, written to ``path``."""
    import yaml

    from vlmlab.prompts import TEMPLATE_SETS

    extra = {f"t{k}": [f"{t} (variant {k})" for t in TEMPLATE_SETS["rocks"]] for k in range(max(0, n - 4))}
    path.write_text("# python bench/study.py\n" + yaml.safe_dump(extra))
    return [*TEMPLATE_SETS, *extra]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the JSON record it appends."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "open_clip:ViT-B-32"],
                        help="model specs; 'tiny' builds the tiny model")
    parser.add_argument("--actors", nargs="+", type=int, default=[1, 2], help="actors per model to compare")
    parser.add_argument("--cells", type=int, default=16, help="cells per model (styles / template sets)")
    parser.add_argument("--tiles", type=int, default=144, help="sample tiles in the zero-shot grid's store")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)

    import ray

    from bench.extract import device_name, frozen_random_weights
    from pipelines.extract import ExtractConfig, extract
    from pipelines.studies.colours import ColourStudyConfig, run_colour_study
    from pipelines.studies.grid import GridConfig, run_grid
    from vlmlab.runtime import start_ray
    from vlmlab.testing.samples import SamplesConfig, write_rock_tiles

    work = Path(args.work or tempfile.mkdtemp(prefix="vlmlab-bench-study-"))
    styles = style_variants(args.cells, work / "styles.yaml")
    templates = template_variants(args.cells, work / "templates.yaml")
    samples = work / "samples"
    if not (samples / "tiles.csv").exists():
        write_rock_tiles(samples, SamplesConfig(grid=int(round(args.tiles**0.5))))
    start_ray(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    rows: dict[str, dict] = {}
    for spec in args.models:
        model = spec
        if spec == "tiny":
            from vlmlab.testing.samples import build_samples
            from vlmlab.testing.tiny import build_tiny_model

            if not (work / "tiny" / "tiny_report.json").exists():
                build_samples(work / "tiny-samples")
                build_tiny_model(work / "tiny", work / "tiny-samples")
            model = str(work / "tiny")
        model = frozen_random_weights(model, work)
        store = work / "stores" / Path(model).name
        extract(ExtractConfig(images=str(samples / "tiles"), model=model, out=str(store), progress_every_s=60))
        row: dict[str, dict] = {"colours": {}, "grid": {}}
        for actors in args.actors:
            cpus = max(1.0, float((os.cpu_count() or 1) // actors))
            out = work / f"colours-{actors}"
            shutil.rmtree(out, ignore_errors=True)
            s = run_colour_study(ColourStudyConfig(models=(model,), styles=tuple(styles), out=str(out),
                                                   styles_file=str(work / "styles.yaml"), actors_per_model=actors,
                                                   cpus_per_actor=cpus))
            row["colours"][str(actors)] = {"cells": len(s.computed), "seconds": s.seconds, "cpus_per_actor": cpus,
                                           "cells_per_s": round(s.cells_per_s, 3), "failed": len(s.failed)}
            out = work / f"grid-{actors}"
            shutil.rmtree(out, ignore_errors=True)
            s = run_grid(GridConfig(templates=tuple(templates), templates_file=str(work / "templates.yaml"),
                                    store=(str(store),), labels=str(samples / "tiles.csv"), out=str(out),
                                    actors_per_model=actors, cpus_per_actor=cpus))
            row["grid"][str(actors)] = {"cells": len(s.computed), "seconds": s.seconds, "cpus_per_actor": cpus,
                                        "cells_per_s": round(s.cells_per_s, 3), "failed": len(s.failed)}
        for study in ("colours", "grid"):
            base = row[study][str(args.actors[0])]["cells_per_s"]
            for actors, r in row[study].items():
                r["vs_first"] = round(r["cells_per_s"] / base, 2) if base else None
                print(f"{spec:20s} {study:8s} {actors} actor(s): {r['cells']} cells in {r['seconds']:6.1f} s = "
                      f"{r['cells_per_s']:.2f} cells/s (x{r['vs_first']} vs {args.actors[0]})", flush=True)
        rows[spec] = row
    ray.shutdown()
    record = {"bench": "study", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
              "cores": os.cpu_count(), "device": device_name("cuda" if _cuda() else "cpu"),
              "cells_per_model": args.cells, "tiles": args.tiles, "models": rows}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
