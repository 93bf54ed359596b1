"""HTML pages of NLVR image pairs: the gallery's contact sheet and evaluation's error analysis.

Both write the pairs' images as files beside the page (``images/<split-set-pair>-img0.png`` ...)
and link them relatively, so the page opens from disk, from a copied folder or behind any static
file server. ``vlmlab vlm gallery --data DATA (--uid UID... | --random N | --bookmarks) --out DIR``
writes ``DIR/index.html``.
"""

from __future__ import annotations

import argparse
import html
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmlab.nlvr_data import export_pair

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
h1 { font-size: 1.3rem; } .summary { color: #555; margin-bottom: 1rem; }
.pairs { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 1rem; }
.pair { border: 1px solid #ccc; border-radius: 6px; padding: .6rem; background: #fafafa; }
.pair.wrong { border-color: #c33; }
.images { display: flex; gap: .4rem; } .images figure { margin: 0; flex: 1; text-align: center; }
.images img { width: 100%; max-width: 240px; image-rendering: pixelated; border: 1px solid #ddd; }
.images figcaption { font-size: .75rem; color: #666; }
.sentence { font-weight: 600; margin: .5rem 0 .3rem; } .uid { font-family: monospace; font-size: .8rem; color: #555; }
table.meta { font-size: .85rem; border-collapse: collapse; } table.meta td { padding: .1rem .5rem .1rem 0; }
.true { color: #17692b; } .false { color: #a11; }
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = html.escape(str(value))
    if str(value) in ("True", "False"):
        return f'<span class="{str(value).lower()}">{text}</span>'
    return text


def write_pair_page(rows: Sequence[dict[str, Any]], out: str | Path, page: str, title: str,
                    fields: Sequence[str] = ("label",), summary: str = "", wrong: bool = False) -> Path:
    """Write ``out/page`` showing each row's two images, sentence, identifier and ``fields``.

    ``rows`` carry ``image0``/``image1`` bytes (as a prepared dataset holds them); the images are
    written to ``out/images/`` and linked relatively. Returns the page's path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cards = []
    for row in rows:
        left, right = (p.relative_to(out).as_posix() for p in export_pair(row, out / "images"))
        meta = "".join(f"<tr><td>{html.escape(f)}</td><td>{_cell(row.get(f, ''))}</td></tr>" for f in fields
                       if row.get(f) is not None)
        cards.append(
            f'<div class="pair{" wrong" if wrong else ""}" id="{html.escape(row["identifier"])}">'
            f'<div class="images"><figure><img src="{left}" alt="left image"><figcaption>left (img0)</figcaption>'
            f'</figure><figure><img src="{right}" alt="right image"><figcaption>right (img1)</figcaption></figure>'
            f'</div><div class="sentence">{html.escape(row["sentence"])}</div>'
            f'<div class="uid">{html.escape(row["identifier"])}</div><table class="meta">{meta}</table></div>')
    body = "\n".join(cards) if cards else "<p>No examples.</p>"
    text = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<div class='summary'>{html.escape(summary)}</div><div class='pairs'>{body}</div></body></html>\n")
    path = out / page
    path.write_text(text)
    return path


def gallery(data: str | Path, out: str | Path, uids: Sequence[str] = (), random_n: int = 0, split: str | None = None,
            seed: int = 0) -> Path:
    """Write a contact sheet (``out/index.html``) of the given UIDs and/or ``random_n`` random examples."""
    from vlmlab.nlvr_data import NlvrDataset

    dataset = NlvrDataset.open(data)
    rows = dataset.find(list(uids)) if uids else []
    if random_n:
        splits = [split] if split else list(dataset.splits)
        pool = [e["identifier"] for s in splits for e in dataset.rows(s, columns=["identifier"], with_images=False)]
        chosen = random.Random(seed).sample(pool, min(random_n, len(pool)))
        rows += dataset.find([u for u in chosen if u not in set(uids)])
    fields = [f for f in ("label", "phenomenon", "synset", "image0_width", "image0_height")
              if any(f in r for r in rows)]
    return write_pair_page(rows, out, "index.html", f"NLVR pairs from {dataset.root.name}", fields,
                           summary=f"{len(rows)} examples from {dataset.root}")


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm gallery --data DATA (--uid UID... | --random N | --bookmarks) --out DIR``."""
    from vlmlab.bookmarks import add_bookmark_arguments, uids_from_args
    from vlmlab.nlvr_data import DatasetError

    parser = argparse.ArgumentParser(prog="vlmlab vlm gallery", description=main.__doc__)
    parser.add_argument("--data", required=True, help="prepared dataset directory (vlmlab vlm data)")
    parser.add_argument("--uid", nargs="+", default=[], help="example identifiers to show")
    parser.add_argument("--random", type=int, default=0, help="also show N random examples")
    parser.add_argument("--split", default=None, help="split to draw random examples from (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draw")
    parser.add_argument("--out", required=True, help="directory for index.html and the exported images")
    add_bookmark_arguments(parser)
    args = parser.parse_args(argv)
    uids = uids_from_args(args)
    if not uids and not args.random:
        parser.error("give --uid UID..., --random N or --bookmarks")
    try:
        page = gallery(args.data, args.out, uids, args.random, args.split, args.seed)
    except DatasetError as exc:
        print(f"vlmlab vlm gallery: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(json.dumps({"page": str(page), "images": str(page.parent / "images")}))


if __name__ == "__main__":
    main()
