"""Prompt templates and prompt-ensembled class embeddings.

Zero-shot classification and text search embed each class or query through several templates
and average the normalised text embeddings (the CLIP paper's prompt ensembling, as in
CLIP_benchmark). Template sets are plain data: add a set here or pass templates explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vlmlab.models import EncoderLike

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "plain": ("{}",),
    "rocks": (
        "a map tile of {}.",
        "a close-up texture of {}.",
        "a photo of {}.",
        "an aerial image of {}.",
        "a geological surface of {}.",
    ),
    "aerial": (
        "a satellite image of {}.",
        "an aerial photograph of {}.",
        "an overhead view of {}.",
        "a remote sensing image showing {}.",
    ),
    "inspection": (
        "a photo of {}.",
        "an inspection photo of {}.",
        "a close-up of {} on an earthen dam.",
        "a crop of {} from a dam inspection image.",
    ),
}


def templates_for(name_or_templates: str | Sequence[str] | None) -> tuple[str, ...]:
    """Resolve a template-set name (``rocks``), a single ``{}`` template, or a list of templates."""
    if name_or_templates is None:
        return TEMPLATE_SETS["plain"]
    if isinstance(name_or_templates, str):
        if name_or_templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[name_or_templates]
        if "{}" in name_or_templates:
            return (name_or_templates,)
        raise ValueError(
            f"unknown template set {name_or_templates!r}: use one of {', '.join(TEMPLATE_SETS)} "
            "or a template containing '{}'"
        )
    templates = tuple(name_or_templates)
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates must contain '{{}}': {bad}")
    return templates


def ensemble_text_embeddings(
    encoder: EncoderLike, phrases: Sequence[str], templates: str | Sequence[str] | None = None
) -> np.ndarray:
    """One L2-normalised embedding (len(phrases), D) per phrase: the mean over templates of the
    normalised embeddings of ``template.format(phrase)``, renormalised."""
    temps = templates_for(templates)
    texts = [t.format(p) for p in phrases for t in temps]
    emb = encoder.encode_texts(texts).reshape(len(phrases), len(temps), -1).mean(1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)
