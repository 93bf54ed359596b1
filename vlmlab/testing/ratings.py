"""Synthetic colour-concept ratings, for trying the colour study without the lab's data.

``vlmlab samples ratings --out ratings.csv`` writes a concept x colour matrix in the ratings
layout (``concept,1..N``; values in [0, 1]) for the lab's 20 concepts over a palette. Each concept
has one or two prototype colours (CIELAB); a colour's rating falls off with its ΔE*ab to the
nearest prototype (Gaussian, width ``sigma``), plus a little seeded noise. They are **not** human
data: they only have the shape of such data, so that every step of the study runs end to end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vlmlab.palette import load_palette
from vlmlab.studies.scores import write_matrix

# concept -> prototype colours (CIELAB); plausible, not measured
PROTOTYPES: dict[str, list[tuple[float, float, float]]] = {
    "apple": [(45, 65, 45), (60, -40, 50)], "banana": [(85, 0, 75)], "cherry": [(30, 50, 20)],
    "grape": [(30, 35, -35), (60, -30, 45)], "peach": [(75, 25, 35)],
    "carrot": [(60, 45, 65)], "celery": [(75, -35, 45)], "corn": [(85, 5, 75)], "eggplant": [(25, 30, -25)],
    "mushroom": [(65, 5, 20), (45, 10, 25)],
    "driving": [(50, 0, 0), (25, 0, -20)], "eating": [(60, 40, 60)], "leisure": [(75, -20, -25)],
    "sleeping": [(20, 10, -40)], "working": [(50, 0, 0), (40, 15, 30)],
    "comfort": [(75, 10, 25)], "efficiency": [(55, -50, 40)], "reliability": [(40, 10, -50)],
    "safety": [(70, 20, 75), (50, -45, 30)], "speed": [(50, 70, 55)],
}


def synthetic_ratings(lab: np.ndarray, concepts: list[str] | None = None, sigma: float = 25.0,
                      noise: float = 0.03, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``(concepts, ratings (C, N))`` over the palette colours ``lab`` (N, 3), values in [0, 1]."""
    concepts = list(concepts or PROTOTYPES)
    rng = np.random.default_rng(seed)
    rows = []
    for concept in concepts:
        protos = np.asarray(PROTOTYPES[concept], np.float64)
        distance = np.linalg.norm(lab[:, None, :] - protos[None], axis=-1).min(axis=1)
        rows.append(np.exp(-0.5 * (distance / sigma) ** 2) + noise * rng.standard_normal(len(lab)))
    return concepts, np.clip(np.asarray(rows), 0.0, 1.0)


def main(argv: list[str] | None = None) -> None:
    """``vlmlab samples ratings --out ratings.csv [--palette uw71|FILE] [--seed 0]``."""
    parser = argparse.ArgumentParser(prog="vlmlab samples ratings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="CSV to write")
    parser.add_argument("--palette", default="uw71", help="uw71 or a CSV of L,a,b rows")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    args = parser.parse_args(argv)
    palette = load_palette(args.palette)
    concepts, values = synthetic_ratings(palette.lab, seed=args.seed)
    path = write_matrix(Path(args.out), concepts, values)
    print(f"synthetic ratings (not human data): {len(concepts)} concepts x {len(palette)} colours -> {path}")


if __name__ == "__main__":
    main()
