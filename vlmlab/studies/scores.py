"""Concept x colour score matrices: computed from a model, written and read as CSV.

The CSV layout (shared by model scores and human ratings): a header row, then one row per
concept; the first column is the concept, the others are the colours in palette order. Column
names vary between sources (``V1..V71``, ``1..71``): they are matched by position, never by name.
A score is the cosine similarity between a colour patch's image embedding and the style's text
embedding of the concept (for a graded style, the expected strength; see
:mod:`vlmlab.studies.styles`).
"""

from __future__ import annotations

import csv
import io
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlmlab.studies.styles import PromptStyle

if TYPE_CHECKING:
    from vlmlab.models import Encoder


@dataclass(frozen=True)
class ScoreMatrix:
    """Rows ``concepts``, columns colours 1..N: ``values`` is (len(concepts), N) float64."""

    concepts: list[str]
    values: np.ndarray

    @property
    def colours(self) -> int:
        """Number of colour columns."""
        return self.values.shape[1]

    def row(self, concept: str) -> np.ndarray:
        """The scores of ``concept`` (matched case-insensitively)."""
        return self.values[self.index()[concept.strip().lower()]]

    def index(self) -> dict[str, int]:
        """Lower-cased concept -> row."""
        return {c.strip().lower(): i for i, c in enumerate(self.concepts)}


def format_matrix(concepts: Sequence[str], values: np.ndarray) -> str:
    """The CSV text of a score matrix: header ``concept,1..N``, values to 7 significant digits."""
    values = np.asarray(values, np.float64)
    if values.ndim != 2 or values.shape[0] != len(concepts):
        raise ValueError(f"scores of shape {values.shape} do not match {len(concepts)} concepts")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["concept", *range(1, values.shape[1] + 1)])
    for concept, row in zip(concepts, values, strict=True):
        writer.writerow([concept, *(f"{v:.7g}" for v in row)])
    return buf.getvalue()


def write_matrix(path: str | Path, concepts: Sequence[str], values: np.ndarray) -> Path:
    """Write a score matrix CSV atomically (a temporary name renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(format_matrix(concepts, values))
    os.replace(tmp, path)
    return path


def read_matrix(path: str | Path) -> ScoreMatrix:
    """Read a concept x colour CSV (scores or ratings); colour columns are taken by position."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except OSError as exc:
        raise ValueError(f"cannot read score matrix {path}: {exc}") from exc
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ValueError(f"{path} needs a header row and at least one concept row")
    width = len(rows[0])
    if width < 2:
        raise ValueError(f"{path}: expected the concept column then one column per colour")
    concepts, values = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != width:
            raise ValueError(f"{path} line {n}: {len(row)} fields, the header has {width}")
        try:
            values.append([float(v) for v in row[1:]])
        except ValueError as exc:
            raise ValueError(f"{path} line {n} ({row[0]!r}): {exc}") from exc
        concepts.append(row[0].strip())
    array = np.asarray(values, np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{path} holds missing or non-finite values")
    if len({c.lower() for c in concepts}) != len(concepts):
        raise ValueError(f"{path} lists a concept twice")
    return ScoreMatrix(concepts, array)


# --------------------------------------------------------------------------- scoring


def style_scores(encoder: Encoder, image_embeddings: np.ndarray, concepts: Sequence[str],
                 style: PromptStyle) -> np.ndarray:
    """(len(concepts), N) scores of ``N`` patches (``image_embeddings``, unit rows) under ``style``.

    Plain styles: cosine to the (ensembled) text embedding. Graded styles: for each template, the
    softmax over strengths of ``logit_scale * cosine`` gives p(x); the score is ``sum_x x p(x)``,
    averaged over templates.
    """
    images = np.asarray(image_embeddings, np.float32)
    if not style.graded and not any("{w}" in t for t in style.templates):
        # a concept-blind style (the control): one text, the same row for every concept
        text = encoder.encode_texts(list(style.templates)).mean(axis=0)
        row = (text / np.linalg.norm(text)) @ images.T
        return np.tile(row.astype(np.float64), (len(concepts), 1))
    if not style.graded:
        from vlmlab.prompts import ensemble_text_embeddings

        templates = [t.replace("{w}", "{}") for t in style.templates]
        text = ensemble_text_embeddings(encoder, list(concepts), templates)
        return (text @ images.T).astype(np.float64)
    n_t, n_x = len(style.templates), len(style.strengths)
    texts = [p for c in concepts for p in style.prompts(c)]
    text = encoder.encode_texts(texts).reshape(len(concepts), n_t, n_x, -1)
    logits = encoder.logit_scale * np.einsum("ctxd,nd->ctnx", text, images).astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=-1, keepdims=True)
    expected = p @ np.asarray(style.strengths, np.float64)  # (C, T, N)
    return expected.mean(axis=1)
