"""Prepare NLVR2 for the VLM laboratory: ``vlmlab vlm data --source SRC --out DATA``.

SRC is one of

- a Hugging Face hub id (``pingzhili/nlvr2``, mirrors ``lmms-lab/NLVR2``, ``HuggingFaceM4/NLVR2``),
  read with ``datasets.load_dataset``, streaming (default) or cached (``--cached`` downloads once
  into the datasets cache, which later runs read offline);
- a local lil-lab directory: JSON lines files (``train.json``, ``dev.json``, ``test1.json``, ...,
  at its top or under ``data/``) whose images ``split-set-pair-img0.png``/``-img1.png`` are found
  by name anywhere below it (``dev/``, ``train/12/``, ``images/train/``);
- a local Parquet or JSON lines export shaped like ``pingzhili/nlvr2`` (columns ``identifier``,
  ``sentence``, ``label``, ``image0``, ``image1``; images as ``{"bytes", "path"}`` structs, raw
  bytes or paths), one file or a directory of ``<split>-*.parquet`` / ``<split>.jsonl`` files.

DATA (see :mod:`vlmlab.nlvr_data`) gets one Parquet part per few hundred rows with both images'
bytes and sizes, and ``manifest.json`` with the source, revision, split sizes, SHA-256 of every
file, the prompt template and the creation time. Bad rows (missing or undecodable image, unknown
label, malformed identifier) are listed in ``bad_rows.jsonl`` with the reason and skipped.
Re-running verifies the existing files against their SHA-256 and reports what changed; ``--verify``
only verifies.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmlab.nlvr import DEFAULT_PROMPT, check_prompt_template
from vlmlab.nlvr_data import FORMAT_VERSION, MANIFEST, sha256_file, verify_files

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
IDENTIFIER = re.compile(r"^[A-Za-z0-9]+-\d+-\d+-\d+$")
EXTRA_FIELDS = ("phenomenon", "synset", "query", "writer")
LOCAL_ALTERNATIVES = ("a local lil-lab NLVR2 directory (JSON lines + images found by name below it), or a local "
                      "Parquet/JSONL export with columns identifier, sentence, label, image0, image1 "
                      "(`vlmlab samples --out SAMPLES` writes a procedural lil-lab set in SAMPLES/nlvr)")


class DataSourceError(ValueError):
    """A source cannot be read at all (as opposed to a bad row, which is recorded and skipped)."""


@dataclass(frozen=True)
class DataConfig:
    """One ``vlmlab vlm data`` run."""

    source: str = field(default="", metadata={"help": "hub id, lil-lab directory, or Parquet/JSONL export"})
    out: str = field(default="", metadata={"help": "dataset directory to write"})
    splits: tuple[str, ...] = field(default=(), metadata={"help": "splits to prepare (default: all the source has)"})
    streaming: bool = field(default=True, metadata={"help": "hub sources: stream (true) or download to the cache"})
    revision: str = field(default="", metadata={"help": "hub sources: dataset revision (branch, tag or commit)"})
    limit: int = field(default=0, metadata={"help": "at most this many rows per split (0: all)"})
    rows_per_part: int = field(default=256, metadata={"help": "rows per Parquet part (the shard of a Ray job)"})
    prompt: str = field(default="", metadata={"help": "prompt template file recorded in the manifest"})


# --------------------------------------------------------------------------- rows


def normalise_label(value: Any) -> str | None:
    """"True"/"False" from the label forms sources use (strings any case, bools, 1/0), else None."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int) and value in (0, 1):
        return "True" if value else "False"
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().capitalize()
    return None


def _image_bytes(value: Any, base: Path | None, index: dict[str, Path] | None) -> tuple[bytes, str]:
    """(bytes, where they came from) of an image field: struct, bytes, a PIL image or a path/name."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"]), value.get("path") or ""
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    if hasattr(value, "save"):  # a PIL image (datasets decodes Image features unless told not to)
        import io

        buf = io.BytesIO()
        value.save(buf, format=getattr(value, "format", None) or "PNG")
        return buf.getvalue(), ""
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute() and base is not None:
            path = base / value
        if not path.is_file() and index is not None:
            path = index.get(Path(value).name, path)
        if not path.is_file():
            raise FileNotFoundError(f"image {value} not found")
        return path.read_bytes(), str(path)
    raise FileNotFoundError("no image")


def clean_row(raw: dict[str, Any], split: str, base: Path | None = None,
              index: dict[str, Path] | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """A dataset row from a source row, or (None, reason) when it must be skipped."""
    from vlmlab.images import ImageDecodeError, decode_image

    identifier = str(raw.get("identifier") or "")
    if not IDENTIFIER.match(identifier):
        return None, f"identifier {identifier!r} is not split-set_id-pair_id-sentence_id"
    label = normalise_label(raw.get("label"))
    if label is None:
        return None, f"unknown label {raw.get('label')!r} (expected True or False)"
    sentence = str(raw.get("sentence") or "").strip()
    if not sentence:
        return None, "empty sentence"
    row: dict[str, Any] = {"identifier": identifier, "sentence": sentence, "label": label}
    _, set_id, pair_id, sentence_id = identifier.split("-")
    row.update(set_id=int(set_id), pair_id=int(pair_id), sentence_id=int(sentence_id))
    for column in ("image0", "image1"):
        try:
            data, where = _image_bytes(raw.get(column), base, index)
            image = decode_image(data)
        except (FileNotFoundError, OSError) as exc:
            return None, f"{column}: missing image ({exc})"
        except ImageDecodeError as exc:
            return None, f"{column}: undecodable image ({exc})"
        row[column] = data
        row[f"{column}_width"], row[f"{column}_height"] = image.size
        row[f"source_{column}"] = where
    for name in EXTRA_FIELDS:
        if raw.get(name) not in (None, ""):
            row[name] = str(raw[name])
    return row, None


# --------------------------------------------------------------------------- sources


def is_hub_id(source: str) -> bool:
    """Whether ``source`` names a hub dataset (org/name) rather than an existing local path."""
    return not Path(source).expanduser().exists() and bool(HUB_ID.match(source))


def _image_index(root: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if "-img" in name:
                index.setdefault(name, Path(dirpath) / name)
    return index


def lil_lab_splits(root: Path) -> dict[str, Path]:
    """Split name -> JSON lines file of a lil-lab directory (top level or ``data/``)."""
    files = {}
    for folder in (root, root / "data", root / "nlvr2" / "data"):
        for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.jsonl")):
            if path.name != MANIFEST:
                files.setdefault(path.stem, path)
    return files


def read_lil_lab(root: Path, splits: Iterable[str]) -> Iterator[tuple[str, dict[str, Any], Path, dict[str, Path]]]:
    """(split, raw row with image file names, base dir, image index) of a lil-lab directory."""
    available = lil_lab_splits(root)
    index = _image_index(root)
    for split in splits:
        with open(available[split]) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield split, {"identifier": f"<line {number}>", "_error": f"not JSON: {exc}"}, root, index
                    continue
                stem = "-".join(str(raw.get("identifier", "")).split("-")[:3])
                raw.setdefault("image0", f"{stem}-img0.png")
                raw.setdefault("image1", f"{stem}-img1.png")
                yield split, raw, root, index


def export_splits(source: Path, default_split: str | None) -> dict[str, list[Path]]:
    """Split name -> files of a Parquet/JSONL export (a file, or a directory of ``<split>-*`` files)."""
    if source.is_file():
        split = default_split or _split_of(source)
        return {split: [source]}
    files: dict[str, list[Path]] = {}
    for path in sorted(source.rglob("*")):
        if path.suffix in (".parquet", ".jsonl") or (path.suffix == ".json" and path.name != MANIFEST):
            files.setdefault(_split_of(path), []).append(path)
    return files


def _split_of(path: Path) -> str:
    return re.split(r"[-.]", path.name, maxsplit=1)[0]


def read_export(files: dict[str, list[Path]],
                splits: Iterable[str]) -> Iterator[tuple[str, dict[str, Any], Path, None]]:
    """(split, raw row, base dir, None) of Parquet/JSONL export files."""
    import pyarrow.parquet as pq

    for split in splits:
        for path in files[split]:
            if path.suffix == ".parquet":
                parquet = pq.ParquetFile(path)
                for batch in parquet.iter_batches(batch_size=64):
                    for raw in batch.to_pylist():
                        yield split, raw, path.parent, None
            else:
                with open(path) as f:
                    for line in f:
                        if line.strip():
                            yield split, json.loads(line), path.parent, None


def read_hub(cfg: DataConfig) -> tuple[dict[str, Any], Iterator[tuple[str, dict[str, Any], None, None]]]:
    """(datasets per split, rows) of a hub dataset; raises :class:`DataSourceError` with the local alternatives."""
    mode = "streaming" if cfg.streaming else "cached"
    try:
        import datasets
    except ImportError as exc:
        raise DataSourceError(f"hub source {cfg.source!r} needs the datasets package (pip install datasets); "
                              f"or use {LOCAL_ALTERNATIVES}") from exc
    try:
        loaded = datasets.load_dataset(cfg.source, streaming=cfg.streaming, revision=cfg.revision or None)
        # keep images as encoded bytes: no decode/re-encode, and the bytes hash the same on every run
        for name, ds in list(loaded.items()):
            for column in ("image0", "image1"):
                if ds.features and column in ds.features:
                    ds = ds.cast_column(column, datasets.Image(decode=False))
            loaded[name] = ds
    except Exception as exc:  # offline, unknown id, no access: one clear message
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise DataSourceError(f"could not load hub dataset {cfg.source!r} ({mode}){offline}: "
                              f"{type(exc).__name__}: {exc}. Use {LOCAL_ALTERNATIVES}.") from exc

    def rows() -> Iterator[tuple[str, dict[str, Any], None, None]]:
        for split in cfg.splits or list(loaded):
            for raw in loaded[split]:
                yield split, raw, None, None

    return loaded, rows()


def hub_revision(cfg: DataConfig) -> str | None:
    """The commit a hub dataset revision resolves to, when the hub can be asked; else the revision given."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(cfg.source, revision=cfg.revision or None).sha
    except Exception:  # offline or no access: record what was asked for
        return cfg.revision or None


def open_source(cfg: DataConfig) -> tuple[str, str | None, list[str], Iterator]:
    """(kind, revision, splits, rows iterator) of ``cfg.source``; raises :class:`DataSourceError`."""
    source = Path(cfg.source).expanduser()
    if not cfg.source:
        raise DataSourceError(f"no --source given; pass a hub id such as pingzhili/nlvr2 or {LOCAL_ALTERNATIVES}")
    if is_hub_id(cfg.source):
        loaded, rows = read_hub(cfg)
        splits = _check_splits(cfg.splits, list(loaded), cfg.source)
        return "hub", hub_revision(cfg), splits, rows
    if not source.exists():
        raise DataSourceError(f"source {cfg.source!r} is neither an existing path nor a hub id (org/name)")
    if source.is_dir() and lil_lab_splits(source):
        splits = _check_splits(cfg.splits, list(lil_lab_splits(source)), cfg.source)
        return "lil-lab", None, splits, read_lil_lab(source.resolve(), splits)
    files = export_splits(source.resolve(), cfg.splits[0] if len(cfg.splits) == 1 else None)
    if not files:
        raise DataSourceError(f"{source} holds no JSON lines (lil-lab) or Parquet/JSONL (export) files")
    splits = _check_splits(cfg.splits, list(files), cfg.source)
    return "export", None, splits, read_export(files, splits)


def _check_splits(wanted: Iterable[str], available: list[str], source: str) -> list[str]:
    wanted = list(wanted) or available
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise DataSourceError(f"{source} has no split(s) {unknown}; it has {', '.join(available)}")
    return wanted


# --------------------------------------------------------------------------- writing


def _write_part(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def write_dataset(cfg: DataConfig, staging: Path) -> dict[str, Any]:
    """Read the source and write the dataset into ``staging``; returns its manifest (not yet saved)."""
    prompt = check_prompt_template(Path(cfg.prompt).read_text()) if cfg.prompt else DEFAULT_PROMPT
    kind, revision, splits, rows = open_source(cfg)
    counts = dict.fromkeys(splits, 0)
    parts = dict.fromkeys(splits, 0)
    pending: dict[str, list[dict[str, Any]]] = {s: [] for s in splits}
    bad: list[dict[str, Any]] = []
    seen: set[str] = set()

    def flush(split: str) -> None:
        if pending[split]:
            _write_part(pending[split], staging / split / f"part-{parts[split]:05d}.parquet")
            parts[split] += 1
            pending[split] = []

    for split, raw, base, index in rows:
        if cfg.limit and counts[split] >= cfg.limit:
            if all(counts[s] >= cfg.limit for s in splits):
                break
            continue
        row, reason = (None, raw["_error"]) if "_error" in raw else clean_row(raw, split, base, index)
        if row is not None and row["identifier"] in seen:
            row, reason = None, "duplicate identifier"
        if row is None:
            bad.append({"split": split, "identifier": str(raw.get("identifier", "")), "reason": reason})
            continue
        seen.add(row["identifier"])
        pending[split].append(row)
        counts[split] += 1
        if len(pending[split]) >= cfg.rows_per_part:
            flush(split)
    for split in splits:
        flush(split)
        (staging / split).mkdir(parents=True, exist_ok=True)
    with open(staging / "bad_rows.jsonl", "w") as f:
        f.writelines(json.dumps(b) + "\n" for b in bad)
    files = {p.relative_to(staging).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in sorted(staging.rglob("*")) if p.is_file()}
    return {"format_version": FORMAT_VERSION, "source": cfg.source, "source_kind": kind, "revision": revision,
            "streaming": cfg.streaming if kind == "hub" else None, "limit": cfg.limit or None,
            "splits": counts, "files": files, "bad_rows": len(bad), "prompt_template": prompt,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def compare_files(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Which files are ``unchanged``, ``changed``, ``added`` or ``removed`` between two manifests."""
    return {"unchanged": sorted(p for p in new if p in old and old[p]["sha256"] == new[p]["sha256"]),
            "changed": sorted(p for p in new if p in old and old[p]["sha256"] != new[p]["sha256"]),
            "added": sorted(p for p in new if p not in old),
            "removed": sorted(p for p in old if p not in new)}


def prepare(cfg: DataConfig) -> dict[str, Any]:
    """Prepare (or re-prepare) ``cfg.out`` from ``cfg.source``; returns a report.

    The report holds the split sizes, the bad rows count and file, the verification of the files a
    previous run wrote (``verify``: ok/changed/missing against that run's SHA-256) and what this run
    changed (``changes``: unchanged/changed/added/removed files). Raises :class:`DataSourceError`.
    """
    if not cfg.out:
        raise DataSourceError("no --out directory given")
    out = Path(cfg.out).expanduser().resolve()
    old = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    verify = verify_files(out, old["files"]) if old else None
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = write_dataset(cfg, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    changes = compare_files(old["files"], manifest["files"]) if old else None
    if old and not (changes["changed"] or changes["added"] or changes["removed"]):
        manifest["created_at"] = old.get("created_at", manifest["created_at"])
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    report = {"out": str(out), "source": cfg.source, "source_kind": manifest["source_kind"],
              "revision": manifest["revision"], "splits": manifest["splits"], "bad_rows": manifest["bad_rows"],
              "bad_rows_file": str(out / "bad_rows.jsonl")}
    if verify is not None:
        report["verify"] = {k: v for k, v in verify.items() if k != "ok"} | {"ok": len(verify["ok"])}
        report["changes"] = {k: v for k, v in changes.items() if k != "unchanged"} | {
            "unchanged": len(changes["unchanged"])}
    return report


def verify_dataset(out: str | Path) -> dict[str, Any]:
    """Verify a dataset directory against its manifest without re-reading the source."""
    from vlmlab.nlvr_data import NlvrDataset

    dataset = NlvrDataset.open(out)
    result = dataset.verify()
    return {"out": str(dataset.root), "ok": len(result["ok"]), "changed": result["changed"],
            "missing": result["missing"], "splits": dataset.splits}


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm data --source SRC --out DATA [--split ...] [--streaming|--cached] [--limit N] [--verify]``."""
    parser = argparse.ArgumentParser(prog="vlmlab vlm data", description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="", help="hub id, lil-lab directory, or Parquet/JSONL export")
    parser.add_argument("--out", required=True, help="dataset directory to write (or verify)")
    parser.add_argument("--split", dest="splits", nargs="+", default=[], help="splits to prepare (default: all)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--streaming", dest="streaming", action="store_true", default=True,
                      help="hub sources: stream rows (default)")
    mode.add_argument("--cached", dest="streaming", action="store_false",
                      help="hub sources: download into the datasets cache once (later runs read it offline)")
    parser.add_argument("--revision", default="", help="hub dataset revision")
    parser.add_argument("--limit", type=int, default=0, help="at most N rows per split")
    parser.add_argument("--rows-per-part", type=int, default=256, help="rows per Parquet part")
    parser.add_argument("--prompt", default="", help="prompt template file ({sentence} field) to record")
    parser.add_argument("--verify", action="store_true", help="only verify DATA against its manifest")
    args = parser.parse_args(argv)
    from vlmlab.nlvr_data import DatasetError

    try:
        if args.verify:
            report = verify_dataset(args.out)
            print(json.dumps(report))
            if report["changed"] or report["missing"]:
                raise SystemExit(1)
            return
        cfg = DataConfig(source=args.source, out=args.out, splits=tuple(args.splits), streaming=args.streaming,
                         revision=args.revision, limit=args.limit, rows_per_part=args.rows_per_part,
                         prompt=args.prompt)
        print(json.dumps(prepare(cfg)))
    except (DataSourceError, DatasetError, ValueError) as exc:
        print(f"vlmlab vlm data: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
