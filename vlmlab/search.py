"""Text, image and combined queries over a store's index: ``vlmlab search`` and the library behind it.

A query vector is ``w_text * text + w_image * image - w_negative * negative``, renormalised, where
each text part is a prompt-ensembled embedding (:mod:`vlmlab.prompts`). Serve's search app, the
benchmarks and the CLI all call :func:`query_vector` and :meth:`SearchIndex.search`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from vlmlab.store import Hit

if TYPE_CHECKING:
    from vlmlab.index import SearchIndex
    from vlmlab.models import Encoder, EncoderLike
    from vlmlab.store import EmbeddingStore

__all__ = ["Hit", "Query", "query_vector", "search", "similar"]


@dataclass
class Query:
    """What to search for: text and/or an image, optionally steered away from ``negative`` text.

    ``weights`` are (text, image, negative). ``negative`` may be several phrases; their
    ensembled embeddings are averaged. ``templates`` is a template-set name or a template list.
    """

    text: str | None = None
    image: Image.Image | None = None
    negative: str | Sequence[str] | None = None
    weights: tuple[float, float, float] = (1.0, 1.0, 0.5)
    k: int = 10
    where: str | None = None
    templates: str | Sequence[str] = "plain"


def query_vector(encoder: EncoderLike, query: Query) -> np.ndarray:
    """The L2-normalised (D,) vector of ``query``; ValueError for an empty query.

    Uses only ``encoder.encode_texts``/``encode_images`` (Serve passes a batching stand-in).
    """
    from vlmlab.prompts import ensemble_text_embeddings

    text = (query.text or "").strip()
    if not text and query.image is None:
        raise ValueError("empty query: give text and/or an image")
    w_text, w_image, w_negative = (float(w) for w in query.weights)
    parts = []
    if text:
        parts.append(w_text * ensemble_text_embeddings(encoder, [text], query.templates)[0])
    if query.image is not None:
        parts.append(w_image * encoder.encode_images([query.image])[0])
    negatives = [query.negative] if isinstance(query.negative, str) else list(query.negative or [])
    negatives = [n.strip() for n in negatives if n and n.strip()]
    if negatives:
        neg = ensemble_text_embeddings(encoder, negatives, query.templates).mean(0)
        parts.append(-w_negative * neg / np.linalg.norm(neg))
    vector = np.sum(parts, axis=0).astype(np.float32)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"the query's weighted parts cancel out (weights {query.weights}); change the weights")
    return vector / norm


def search(index: SearchIndex, encoder: Encoder, query: Query) -> list[Hit]:
    """Top ``query.k`` hits of ``query`` in ``index`` (honouring ``query.where``), best first."""
    return index.search(query_vector(encoder, query)[None, :], query.k, where=query.where)[0]


def similar(index: SearchIndex, image_id: int, k: int = 10, where: str | None = None) -> list[Hit]:
    """The ``k`` store images most like store image ``image_id``, itself excluded; KeyError if unknown."""
    hits = index.search(index.vector(image_id)[None, :], k + 1, where=where)[0]
    return [h for h in hits if h.id != int(image_id)][:k]


# --------------------------------------------------------------------------- output


def print_hits(hits: Sequence[Hit], as_json: bool = False) -> None:
    """Print hits as a table (rank, id, score, path) or, with ``as_json``, one JSON object per line."""
    if as_json:
        for rank, hit in enumerate(hits, 1):
            print(json.dumps({"rank": rank, **hit.as_dict()}))
        return
    print(f"{'rank':>4}  {'id':>20}  {'score':>7}  path")
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>4}  {hit.id:>20}  {hit.score:7.4f}  {hit.path}")


def write_montage(index: SearchIndex, hits: Sequence[Hit], out: str | Path) -> Path:
    """A contact sheet of the hits' images captioned with rank and score."""
    from vlmlab.montage import contact_sheet

    return contact_sheet([index.path_of(h.id) for h in hits],
                         [f"#{r} {h.score:.3f}" for r, h in enumerate(hits, 1)], out)


def open_for_query(store_dir: str | Path, device: str | None = None, model: str | None = None
                   ) -> tuple[SearchIndex, Encoder]:
    """(index, encoder) of a store: the index built/updated if missing or stale (logged), and the store's
    model with its adapter (or ``model``, see :func:`store_encoder`)."""
    from vlmlab.index import ensure_index
    from vlmlab.store import EmbeddingStore

    store = EmbeddingStore.open(store_dir)
    return ensure_index(store), store_encoder(store, device, model)


def store_encoder(store: EmbeddingStore, device: str | None = None, model: str | None = None) -> Encoder:
    """The model a store was extracted with (its spec and adapter), for queries against it.

    ``model`` overrides the recorded spec: the same weights under another path or name (a moved model
    directory, a hub cache). Its embedding size must match the store's. A recorded spec that no longer
    resolves raises ``ModelSpecError`` saying to pass ``--model``."""
    from vlmlab.models import ModelSpecError, load_model

    manifest = store.manifest
    try:
        encoder = load_model(model or manifest["model"], device=device, adapter=manifest.get("adapter"))
    except ModelSpecError as exc:
        if model:
            raise
        raise ModelSpecError(f"{exc} (store {store.root} records model {manifest['model']!r}; if it moved, pass "
                             "--model with its new location)") from exc
    if encoder.embed_dim != manifest["embed_dim"]:
        raise ValueError(f"--model {model!r} embeds in {encoder.embed_dim} dims; store {store.root} holds "
                         f"{manifest['embed_dim']}-dim embeddings of {manifest['model']!r}")
    return encoder


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """-k, --where, --json, --montage, --model, --device: shared by ``search`` and ``similar``."""
    parser.add_argument("-k", type=int, default=10, help="number of hits (default: 10)")
    parser.add_argument("--model", default=None, help="query with this spec instead of the store's recorded one "
                                                      "(the same model at another path)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--where", default=None, help="metadata filter, e.g. \"source='real' AND tile_z=17\"")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    parser.add_argument("--montage", default=None, metavar="PNG", help="also write a contact sheet of the hits")


def emit(index: SearchIndex, hits: Sequence[Hit], args: argparse.Namespace) -> None:
    """Print hits and write the montage the flags ask for."""
    print_hits(hits, as_json=args.json)
    if args.montage:
        path = write_montage(index, hits, args.montage)
        if not args.json:
            print(f"montage: {path}")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab search STORE --text ... [--image PATH] [--negative ...] [--weights 1 1 0.5] [-k 10]
    [--where ...] [--templates rocks] [--json] [--montage out.png]``."""
    from vlmlab.images import read_image

    parser = argparse.ArgumentParser(prog="vlmlab search", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help="embedding store (indexed if needed)")
    parser.add_argument("--text", default=None, help="what to find, e.g. 'layered sandstone'")
    parser.add_argument("--image", default=None, help="an image file to search similar to")
    parser.add_argument("--negative", action="append", default=None,
                        help="text to steer away from; repeat for several phrases (their embeddings are averaged)")
    parser.add_argument("--weights", nargs=3, type=float, default=(1.0, 1.0, 0.5), metavar=("TEXT", "IMAGE", "NEG"),
                        help="weights of text, image and negative parts (default: 1 1 0.5)")
    parser.add_argument("--templates", nargs="+", default=["plain"],
                        help="prompt template set (plain, rocks, aerial, inspection) or templates with {}")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if not (args.text or "").strip() and not args.image:
        parser.error("empty query: give --text and/or --image")
    templates = args.templates[0] if len(args.templates) == 1 else args.templates
    image = read_image(args.image) if args.image else None
    index, encoder = open_for_query(args.store_dir, args.device, args.model)
    query = Query(text=args.text, image=image, negative=args.negative, weights=tuple(args.weights), k=args.k,
                  where=args.where, templates=templates)
    emit(index, search(index, encoder, query), args)


if __name__ == "__main__":
    main()
