"""The NLVR2 task: the lab's prompt, answer parsing and the official metrics.

NLVR2 (lil-lab/nlvr, ``nlvr2/``) pairs two images with a sentence labelled "True" or "False".
Identifiers read ``split-set_id-pair_id-sentence_id`` (``dev-850-0-0``); every sentence of a set
is paired with several image pairs. The official script (``nlvr2/eval/metrics.py``) reads a CSV of
``identifier,prediction`` and reports

- accuracy: predictions equal to the label, compared case-insensitively, over all examples;
- consistency: the fraction of unique sentences whose examples are all right, a sentence being
  the identifier with its pair id blanked (``dev-850--0``).

:func:`nlvr_metrics` computes both exactly so; evaluation, ``vlmlab vlm score``, training and the
Tune search all report through it.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# The lab's prompt (a template with one {sentence} field); --prompt FILE replaces it.
DEFAULT_PROMPT = ("You are given two images. Decide whether the statement is true.\n"
                  "Statement: {sentence}\nAnswer with either True or False.")
LABELS = ("True", "False")
_ANSWER = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)


class MetricsError(ValueError):
    """Predictions do not cover the labelled examples (the official script refuses to score then)."""


def format_prompt(template: str, sentence: str) -> str:
    """The user text for one example: ``template`` with ``{sentence}`` filled in."""
    return template.replace("{sentence}", sentence)


def check_prompt_template(template: str) -> str:
    """Return ``template`` if it holds exactly one ``{sentence}`` field, else raise ValueError."""
    if template.count("{sentence}") != 1:
        raise ValueError("a prompt template must hold the field {sentence} exactly once; got: " + repr(template[:200]))
    return template


def parse_answer(text: str) -> str | None:
    """"True"/"False" from a generated answer, or None when it says neither.

    The first of true/false/yes/no (any case, as a word) decides, so "True." and "yes, it is" parse
    and "The statement is false" parses as False.
    """
    match = _ANSWER.search(text or "")
    if match is None:
        return None
    return "True" if match.group(1).lower() in ("true", "yes") else "False"


def sentence_key(identifier: str) -> str:
    """The identifier with its pair id blanked: the official consistency groups by it."""
    parts = identifier.split("-")
    if len(parts) < 4:
        raise ValueError(f"identifier {identifier!r} is not split-set_id-pair_id-sentence_id")
    parts[2] = ""
    return "-".join(parts)


def set_id(identifier: str) -> str:
    """``split-set_id`` of an identifier: the image set an example belongs to."""
    return "-".join(identifier.split("-")[:2])


def nlvr_metrics(predictions: Mapping[str, str], examples: Sequence[Mapping[str, Any]],
                 by: str | None = None) -> dict[str, Any]:
    """Accuracy and consistency of ``predictions`` (identifier -> "True"/"False") on ``examples``.

    ``examples`` hold ``identifier`` and ``label``. Exactly the official script: every example must
    have a prediction (:class:`MetricsError` lists the missing ones), extra predictions are ignored,
    labels and predictions are compared lower-cased. ``by`` names an example field (e.g.
    ``phenomenon``) to break accuracy and consistency down by, under ``"by_<field>"``.
    Returns ``{"accuracy", "consistency", "n", "sentences"}`` (+ the breakdown).
    """
    missing = [e["identifier"] for e in examples if e["identifier"] not in predictions]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise MetricsError(f"some predictions are missing: got {len(predictions)}, expected {len(examples)}; "
                           f"{len(missing)} missing: {shown}")
    out = _score(predictions, examples)
    if by and examples and all(e.get(by) not in (None, "") for e in examples):
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for e in examples:
            groups.setdefault(str(e[by]), []).append(e)
        out[f"by_{by}"] = {k: _score(predictions, v) for k, v in sorted(groups.items())}
    return out


def _score(predictions: Mapping[str, str], examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    correct = 0
    consistent: dict[str, bool] = {}
    for e in examples:
        key = sentence_key(e["identifier"])
        consistent.setdefault(key, True)
        if str(predictions[e["identifier"]]).lower() == str(e["label"]).lower():
            correct += 1
        else:
            consistent[key] = False
    n = len(examples)
    return {"accuracy": correct / n if n else 0.0,
            "consistency": sum(consistent.values()) / len(consistent) if consistent else 0.0,
            "n": n, "sentences": len(consistent)}


def read_predictions_csv(path: str | Path) -> dict[str, str]:
    """An official predictions file (``identifier,prediction`` per line, no header needed) as a dict.

    A header line ``identifier,prediction`` is skipped; blank lines are ignored.
    """
    out: dict[str, str] = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip():
                continue
            if row[0].strip() == "identifier" and len(row) > 1 and row[1].strip() == "prediction":
                continue
            if len(row) < 2:
                raise ValueError(f"{path}: line {row!r} is not identifier,prediction")
            out[row[0].strip()] = row[1].strip()
    return out


def write_predictions_csv(path: str | Path, predictions: Iterable[tuple[str, str]]) -> Path:
    """Write ``identifier,prediction`` lines, the form the official script reads (no header)."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        for identifier, prediction in predictions:
            writer.writerow([identifier, prediction])
    return path


def score_file(predictions: str | Path, data: str | Path, split: str) -> dict[str, Any]:
    """Score an official predictions CSV against a prepared split: ``{"accuracy", "consistency", "n"}``."""
    from vlmlab.nlvr_data import NlvrDataset

    metrics = nlvr_metrics(read_predictions_csv(predictions), NlvrDataset.open(data).examples(split))
    return {k: metrics[k] for k in ("accuracy", "consistency", "n")}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm score --predictions CSV --data DATA --split S``: one JSON line, as the official script scores."""
    import argparse
    import json
    import sys

    from vlmlab.nlvr_data import DatasetError

    parser = argparse.ArgumentParser(prog="vlmlab vlm score", description=main.__doc__)
    parser.add_argument("--predictions", required=True, help="CSV of identifier,prediction lines")
    parser.add_argument("--data", required=True, help="prepared dataset directory (vlmlab vlm data)")
    parser.add_argument("--split", required=True, help="split the predictions are for")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(score_file(args.predictions, args.data, args.split)))
    except (MetricsError, DatasetError, OSError, ValueError) as exc:
        print(f"vlmlab vlm score: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
