"""Prompt styles and concept lists of the colour-concept association study.

A prompt style turns a concept word into the text(s) a patch is compared with. Styles are data:

- ``1``: "The color of the image represents the word {w}."
- ``2``: "The concept {w} is well represented by the color of the image."
- ``3``: "The color of the image is associated with the concept {w}."
- ``4``: "The color of the image is associated with the concept {w} with an association strength of {x}
  out of 1." for x = 0, 0.1, ..., 1 (written ``0``, ``0.1``, ..., ``1``): eleven prompts per concept.
  Aggregation rule: for a patch, the eleven cosine similarities become a distribution over the
  strengths by ``softmax(logit_scale * cosine)`` (the model's own temperature, as it scores
  classes), and the score is the expected strength ``sum_x x * p(x)``, a number in [0, 1]. A
  model that reads the strength sentence puts its mass on the strength humans would give; one
  that ignores it spreads the mass evenly and scores every patch about 0.5 (flat, low fit).
- ``control``: "The color of the image is yellow." (``control-red`` etc. name another colour): the
  prompt does not mention the concept, so every concept gets the same row. Its fit is what a
  concept-blind colour preference achieves; a style is only informative where it beats it.

A style with several templates (no ``{x}``) is a prompt ensemble: the normalised text embeddings
are averaged and renormalised (:func:`vlmlab.prompts.ensemble_text_embeddings`).

User styles come from a YAML file mapping a name to a template, a list of templates, or
``{templates: [...], strengths: [...]}`` for a graded style like ``4`` (see
``vlmlab/studies/example_styles.yaml``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STRENGTHS = tuple(round(0.1 * i, 1) for i in range(11))
STYLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CONTROL_PREFIX = "control"


class StyleError(ValueError):
    """A prompt style name or styles file is not usable; the message says what to fix."""


@dataclass(frozen=True)
class PromptStyle:
    """How a concept becomes prompts: ``templates`` hold ``{w}`` (the concept) and, in a graded style,
    ``{x}`` (an association strength from ``strengths``)."""

    name: str
    templates: tuple[str, ...]
    strengths: tuple[float, ...] = ()

    @property
    def graded(self) -> bool:
        """Whether the score is the expected strength over ``strengths`` (style 4) rather than a cosine."""
        return bool(self.strengths)

    def prompts(self, concept: str) -> list[str]:
        """Every text this style compares a patch with for ``concept`` (graded: one per strength)."""
        if self.graded:
            return [t.format(w=concept, x=f"{x:g}") for t in self.templates for x in self.strengths]
        return [t.format(w=concept) for t in self.templates]

    def describe(self) -> dict[str, Any]:
        """A JSON-able record of the style (kept in the study manifest, so a changed style is noticed)."""
        return {"templates": list(self.templates), "strengths": list(self.strengths)}


BUILTIN_STYLES: dict[str, PromptStyle] = {
    "1": PromptStyle("1", ("The color of the image represents the word {w}.",)),
    "2": PromptStyle("2", ("The concept {w} is well represented by the color of the image.",)),
    "3": PromptStyle("3", ("The color of the image is associated with the concept {w}.",)),
    "4": PromptStyle("4", ("The color of the image is associated with the concept {w} with an association "
                           "strength of {x} out of 1.",), STRENGTHS),
}
ALL_STYLES = (*BUILTIN_STYLES, CONTROL_PREFIX)


def control_style(name: str = CONTROL_PREFIX) -> PromptStyle:
    """``control`` (yellow) or ``control-COLOUR``: a concept-blind prompt naming a colour."""
    colour = name[len(CONTROL_PREFIX) + 1:].replace("_", " ") if name != CONTROL_PREFIX else "yellow"
    if not colour:
        raise StyleError(f"style {name!r}: write control or control-COLOUR, e.g. control-red")
    return PromptStyle(name, (f"The color of the image is {colour}.",))


def _check(style: PromptStyle) -> PromptStyle:
    if not STYLE_NAME.match(style.name):
        raise StyleError(f"style name {style.name!r} must be letters, digits, '.', '_' or '-' (it names a file)")
    if not style.templates:
        raise StyleError(f"style {style.name!r} has no templates")
    for template in style.templates:
        try:
            template.format(w="concept", x="0.5")
        except (KeyError, IndexError, ValueError) as exc:
            raise StyleError(f"style {style.name!r}: template {template!r} may use only {{w}} and {{x}}: {exc}") \
                from exc
        if style.graded and "{x}" not in template:
            raise StyleError(f"style {style.name!r} has strengths but template {template!r} has no {{x}}")
        if not style.graded and "{x}" in template:
            raise StyleError(f"style {style.name!r}: template {template!r} has {{x}} but the style lists no strengths")
    if style.graded and any(not 0 <= x <= 1 for x in style.strengths):
        raise StyleError(f"style {style.name!r}: strengths must lie in [0, 1]")
    return style


def load_styles_file(path: str | Path) -> dict[str, PromptStyle]:
    """User styles from YAML: ``name: template``, ``name: [templates]`` or
    ``name: {templates: [...], strengths: [...]}``."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise StyleError(f"cannot read styles file {path}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise StyleError(f"styles file {path} must map style names to templates")
    styles = {}
    for name, spec in data.items():
        name = str(name)
        if isinstance(spec, str):
            style = PromptStyle(name, (spec,))
        elif isinstance(spec, Sequence):
            style = PromptStyle(name, tuple(str(t) for t in spec))
        elif isinstance(spec, Mapping) and "templates" in spec:
            templates = spec["templates"]
            templates = (templates,) if isinstance(templates, str) else tuple(str(t) for t in templates)
            style = PromptStyle(name, templates, tuple(float(x) for x in spec.get("strengths", ())))
        else:
            raise StyleError(f"{path}: style {name!r} must be a template, a list of templates or "
                             "{templates: [...], strengths: [...]}")
        if name in BUILTIN_STYLES or name.startswith(CONTROL_PREFIX):
            raise StyleError(f"{path}: style {name!r} clashes with a built-in style name")
        styles[name] = _check(style)
    return styles


def resolve_styles(names: Sequence[str], user: Mapping[str, PromptStyle] | None = None) -> list[PromptStyle]:
    """The styles called ``names`` (built-in, ``control[-COLOUR]`` or from ``user``); ``all`` is every
    built-in style plus every user style."""
    user = dict(user or {})
    expanded: list[str] = []
    for name in names:
        expanded += [*ALL_STYLES, *user] if name == "all" else [str(name)]
    out = []
    for name in dict.fromkeys(expanded):
        if name in BUILTIN_STYLES:
            out.append(BUILTIN_STYLES[name])
        elif name in user:
            out.append(user[name])
        elif name == CONTROL_PREFIX or name.startswith(CONTROL_PREFIX + "-"):
            out.append(_check(control_style(name)))
        else:
            raise StyleError(f"unknown prompt style {name!r}: use {', '.join(ALL_STYLES)}, control-COLOUR, all, "
                             f"or a style of --styles-file{' (' + ', '.join(user) + ')' if user else ''}")
    if not out:
        raise StyleError("no prompt styles given")
    return out


# --------------------------------------------------------------------------- concepts

# The 20 concepts of the lab's ratings (Schloss lab), by category: the default concept list and
# the categories analyse groups by. A concepts file or the ratings file replaces the list.
DEFAULT_CATEGORIES: dict[str, str] = {
    **dict.fromkeys(("apple", "banana", "cherry", "grape", "peach"), "fruits"),
    **dict.fromkeys(("carrot", "celery", "corn", "eggplant", "mushroom"), "vegetables"),
    **dict.fromkeys(("driving", "eating", "leisure", "sleeping", "working"), "activities"),
    **dict.fromkeys(("comfort", "efficiency", "reliability", "safety", "speed"), "features"),
}
OTHER_CATEGORY = "other"


def read_concepts(path: str | Path) -> dict[str, str]:
    """Concepts (in order) and their categories from a CSV with a ``concept`` column (and optionally
    ``category``), or from a text file of one ``concept[,category]`` per line. A concept without a
    category gets its default one (the lab's 20) or ``other``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read concepts file {path}: {exc}") from exc
    rows = [r for r in csv.reader(text.splitlines()) if r and r[0].strip() and not r[0].startswith("#")]
    if rows and rows[0][0].strip().lower() == "concept":
        header = [h.strip().lower() for h in rows[0]]
        cat = header.index("category") if "category" in header else None
        rows = [[r[0], r[cat] if cat is not None and cat < len(r) else ""] for r in rows[1:]]
    concepts = {}
    for row in rows:
        concept = row[0].strip()
        category = row[1].strip() if len(row) > 1 else ""
        concepts[concept] = category or default_category(concept)
    if not concepts:
        raise ValueError(f"concepts file {path} lists no concepts")
    return concepts


def default_category(concept: str) -> str:
    """The lab's category of one of its 20 concepts, else ``other``."""
    return DEFAULT_CATEGORIES.get(concept.strip().lower(), OTHER_CATEGORY)
