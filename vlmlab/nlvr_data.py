"""A prepared NLVR2 dataset directory (written by ``vlmlab vlm data``): reading, checking, one example.

Layout::

    DATA/manifest.json                 source, revision, split sizes, prompt template, created_at,
                                       files: {relative path: {"sha256", "bytes"}}, bad_rows
    DATA/<split>/part-00000.parquet     rows: identifier, sentence, label, set_id, pair_id,
                                       sentence_id, image0, image1 (encoded bytes), image0_width,
                                       image0_height, image1_width, image1_height, source_image0,
                                       source_image1, and the optional fields the source has
                                       (phenomenon, synset, query, writer)

Images live inside the Parquet parts (as Hugging Face datasets store them), so a dataset directory
is self-contained: copy it to the cluster's shared storage and every node reads the same bytes.
Parts hold at most a few hundred rows, so a Ray Data job reads them as shards.

``vlmlab vlm sample UID --data DATA [--export DIR]`` prints one example's metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
IMAGE_COLUMNS = ("image0", "image1")


class DatasetError(ValueError):
    """A dataset directory, split or identifier is missing or does not match its manifest."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(root: str | Path, files: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Compare files under ``root`` with their recorded SHA-256: ``{"ok", "changed", "missing"}`` (paths)."""
    root = Path(root)
    report: dict[str, list[str]] = {"ok": [], "changed": [], "missing": []}
    for rel, meta in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            report["missing"].append(rel)
        elif sha256_file(path) != meta["sha256"]:
            report["changed"].append(rel)
        else:
            report["ok"].append(rel)
    return report


@dataclass
class NlvrDataset:
    """An open dataset directory: its manifest and lazy access to split rows."""

    root: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, root: str | Path) -> NlvrDataset:
        """Open ``root``; raises :class:`DatasetError` when it holds no manifest."""
        root = Path(root).expanduser().resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise DatasetError(f"{root} is not a prepared NLVR dataset (no {MANIFEST}); "
                               "make one with `vlmlab vlm data --source SRC --out DIR`")
        return cls(root, json.loads(path.read_text()))

    @property
    def splits(self) -> dict[str, int]:
        """Split name -> row count."""
        return dict(self.manifest.get("splits", {}))

    @property
    def prompt(self) -> str:
        """The prompt template recorded when the data was prepared."""
        from vlmlab.nlvr import DEFAULT_PROMPT

        return self.manifest.get("prompt_template") or DEFAULT_PROMPT

    def parts(self, split: str) -> list[Path]:
        """The Parquet parts of ``split``, in order; raises :class:`DatasetError` for an unknown split."""
        if split not in self.splits:
            raise DatasetError(f"{self.root} has no split {split!r}; it has {', '.join(self.splits) or 'none'}")
        return sorted((self.root / split).glob("part-*.parquet"))

    def rows(self, split: str, columns: Sequence[str] | None = None, with_images: bool = True) -> list[dict[str, Any]]:
        """Every row of ``split`` as dicts (image bytes included unless ``with_images`` is False)."""
        import pyarrow.parquet as pq

        out: list[dict[str, Any]] = []
        for part in self.parts(split):
            schema = pq.read_schema(part)
            names = [c for c in (columns or schema.names) if c in schema.names]
            if not with_images:
                names = [c for c in names if c not in IMAGE_COLUMNS]
            out += pq.read_table(part, columns=names).to_pylist()
        return out

    def examples(self, split: str) -> list[dict[str, Any]]:
        """Rows of ``split`` without image bytes (identifier, label, sentence, ...: what metrics need)."""
        return self.rows(split, with_images=False)

    def find(self, identifiers: Sequence[str], splits: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The rows (with images) of ``identifiers``, in that order; raises DatasetError naming unknown ones."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        wanted = list(dict.fromkeys(identifiers))
        found: dict[str, dict[str, Any]] = {}
        names = list(splits or self.splits)
        by_split = {s: [i for i in wanted if i.split("-")[0] == s] for s in names}
        for split in names:
            # identifiers start with their split; look everywhere for sources that name splits otherwise
            ids = by_split[split] or [i for i in wanted if i not in found]
            if not ids:
                continue
            for part in self.parts(split):
                table = pq.read_table(part)
                table = table.filter(pc.is_in(table["identifier"], value_set=_array(ids)))
                for row in table.to_pylist():
                    found[row["identifier"]] = {**row, "split": split}
        missing = [i for i in wanted if i not in found]
        if missing:
            raise DatasetError(f"unknown identifier(s) in {self.root}: {', '.join(missing[:10])}")
        return [found[i] for i in identifiers]

    def iter_batches(self, split: str, batch_size: int) -> Iterator[list[dict[str, Any]]]:
        """Rows of ``split`` (with images) in batches of ``batch_size``, reading one part at a time."""
        import pyarrow.parquet as pq

        batch: list[dict[str, Any]] = []
        for part in self.parts(split):
            for row in pq.read_table(part).to_pylist():
                batch.append(row)
                if len(batch) == batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def verify(self) -> dict[str, list[str]]:
        """Check every file the manifest lists against its SHA-256 (see :func:`verify_files`)."""
        return verify_files(self.root, self.manifest.get("files", {}))


def _array(values: Sequence[str]):
    import pyarrow as pa

    return pa.array(list(values), pa.string())


def pair_images(row: dict[str, Any]) -> list[Image.Image]:
    """The decoded RGB (left, right) images of a row."""
    from vlmlab.images import decode_image

    return [decode_image(row[c]) for c in IMAGE_COLUMNS]


def image_suffix(data: bytes) -> str:
    """The file extension matching encoded image bytes (``.png``, ``.jpg``, ...), from their header."""
    fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
    return {"jpeg": ".jpg", "tiff": ".tif"}.get(fmt, f".{fmt}")


def export_pair(row: dict[str, Any], out: str | Path) -> list[Path]:
    """Write a row's two images (their original bytes) as ``out/<split-set-pair>-img0.ext`` / ``-img1``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "-".join(row["identifier"].split("-")[:3])
    paths = []
    for k, column in enumerate(IMAGE_COLUMNS):
        path = out / f"{stem}-img{k}{image_suffix(row[column])}"
        if not path.is_file():
            path.write_bytes(row[column])
        paths.append(path)
    return paths


def example_metadata(row: dict[str, Any]) -> dict[str, Any]:
    """A row without image bytes (what ``vlmlab vlm sample`` prints)."""
    return {k: v for k, v in row.items() if k not in IMAGE_COLUMNS}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm sample UID --data DATA [--export DIR]``: one example's metadata (and its images)."""
    from vlmlab.bookmarks import add_bookmark_arguments, uids_from_args

    parser = argparse.ArgumentParser(prog="vlmlab vlm sample", description=main.__doc__)
    parser.add_argument("uid", nargs="*", help="example identifier(s), e.g. dev-160-0-0")
    parser.add_argument("--data", required=True, help="prepared dataset directory (vlmlab vlm data)")
    parser.add_argument("--export", default=None, help="also write the example's two images into this directory")
    add_bookmark_arguments(parser)
    args = parser.parse_args(argv)
    uids = uids_from_args(args)
    if not uids:
        parser.error("give at least one UID (or --bookmarks)")
    try:
        rows = NlvrDataset.open(args.data).find(uids)
    except DatasetError as exc:
        print(f"vlmlab vlm sample: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    for row in rows:
        meta = example_metadata(row)
        if args.export:
            meta["exported"] = [str(p) for p in export_pair(row, args.export)]
        print(json.dumps(meta, default=str))


if __name__ == "__main__":
    main()
