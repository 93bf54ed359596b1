"""Bookmarked NLVR examples: a small persistent list of UIDs (identifiers) with optional notes.

``vlmlab vlm bookmark add UID [UID ...] [--note TEXT]``, ``vlmlab vlm bookmark list``,
``vlmlab vlm bookmark remove UID``. The list is a JSON file (``--file``, default
``~/.vlmlab/bookmarks.json``); every verb that takes UIDs also takes ``--bookmarks`` (all bookmarked
UIDs) and ``--bookmarks-file``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_FILE = Path("~/.vlmlab/bookmarks.json")


def bookmarks_path(path: str | Path | None = None) -> Path:
    """The bookmarks file: ``path`` if given, else ``~/.vlmlab/bookmarks.json``."""
    return Path(path or DEFAULT_FILE).expanduser()


def load_bookmarks(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Bookmarks in the order they were added (``uid``, ``note``, ``added``); [] when there is no file."""
    path = bookmarks_path(path)
    if not path.is_file():
        return []
    data = json.loads(path.read_text() or "[]")
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a bookmarks file (expected a JSON list)")
    return data


def _save(bookmarks: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(bookmarks, indent=1) + "\n")
    os.replace(tmp, path)  # a crash never leaves half a file


def add_bookmarks(uids: list[str], note: str = "", path: str | Path | None = None) -> list[dict[str, Any]]:
    """Add UIDs (already bookmarked ones get the new note); returns the list."""
    path = bookmarks_path(path)
    bookmarks = load_bookmarks(path)
    known = {b["uid"]: b for b in bookmarks}
    for uid in uids:
        if uid in known:
            if note:
                known[uid]["note"] = note
        else:
            entry = {"uid": uid, "note": note, "added": time.strftime("%Y-%m-%dT%H:%M:%S")}
            bookmarks.append(entry)
            known[uid] = entry
    _save(bookmarks, path)
    return bookmarks


def remove_bookmarks(uids: list[str], path: str | Path | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Remove UIDs; returns (the list, UIDs that were not bookmarked)."""
    path = bookmarks_path(path)
    bookmarks = load_bookmarks(path)
    absent = [u for u in uids if u not in {b["uid"] for b in bookmarks}]
    bookmarks = [b for b in bookmarks if b["uid"] not in set(uids)]
    _save(bookmarks, path)
    return bookmarks, absent


def add_bookmark_arguments(parser: argparse.ArgumentParser) -> None:
    """``--bookmarks`` (take every bookmarked UID) and ``--bookmarks-file`` for a verb that takes UIDs."""
    parser.add_argument("--bookmarks", action="store_true", help="also take every bookmarked UID")
    parser.add_argument("--bookmarks-file", default=None, help=f"bookmarks file (default: {DEFAULT_FILE})")


def uids_from_args(args: argparse.Namespace, name: str = "uid") -> list[str]:
    """The UIDs a verb was given (positional/``--uid``) followed by the bookmarked ones with ``--bookmarks``."""
    uids = list(getattr(args, name, None) or [])
    if getattr(args, "bookmarks", False):
        uids += [b["uid"] for b in load_bookmarks(args.bookmarks_file)]
    return list(dict.fromkeys(uids))


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm bookmark add|list|remove [UID ...] [--note TEXT] [--file PATH]``."""
    parser = argparse.ArgumentParser(prog="vlmlab vlm bookmark", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("add", "list", "remove"))
    parser.add_argument("uid", nargs="*", help="example identifier(s)")
    parser.add_argument("--note", default="", help="a note kept with added UIDs")
    parser.add_argument("--file", default=None, help=f"bookmarks file (default: {DEFAULT_FILE})")
    args = parser.parse_args(argv)
    if args.action != "list" and not args.uid:
        parser.error(f"{args.action} needs at least one UID")
    if args.action == "add":
        bookmarks = add_bookmarks(args.uid, args.note, args.file)
    elif args.action == "remove":
        bookmarks, absent = remove_bookmarks(args.uid, args.file)
        if absent:
            print(json.dumps({"not_bookmarked": absent}))
    else:
        bookmarks = load_bookmarks(args.file)
    for entry in bookmarks:
        print(json.dumps(entry))
    if args.action != "list":
        print(f"{len(bookmarks)} bookmark(s) in {bookmarks_path(args.file)}")


if __name__ == "__main__":
    main()
