"""``vlmlab similar STORE --image PATH | --id N``: images of the store most like a given one."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    """``vlmlab similar STORE (--image PATH | --id N) [-k 10] [--where ...] [--json] [--montage out.png]``.

    With ``--id`` the store's own vector is used and the image itself is left out of the hits;
    with ``--image`` a file whose bytes are already in the store uses its stored vector (so it ranks
    first at score 1, whatever precision the store was extracted at), any other file is embedded
    with the store's model.
    """
    from vlmlab.search import Query, add_output_arguments, emit, open_for_query, search, similar

    parser = argparse.ArgumentParser(prog="vlmlab similar", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help="embedding store (indexed if needed)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", default=None, help="an image file")
    which.add_argument("--id", type=int, default=None, help="id of a store image (as `vlmlab search` prints)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.id is not None:
        from vlmlab.index import ensure_index
        from vlmlab.store import EmbeddingStore

        index = ensure_index(EmbeddingStore.open(args.store_dir))
        try:
            hits = similar(index, args.id, args.k, where=args.where)
        except KeyError as exc:
            parser.error(str(exc.args[0]))
    else:
        from pathlib import Path

        from vlmlab.images import content_hash, read_image
        from vlmlab.index import ensure_index
        from vlmlab.store import EmbeddingStore

        index = ensure_index(EmbeddingStore.open(args.store_dir))
        digest = content_hash(Path(args.image).read_bytes())
        stored = index.store.read(columns=["id"], where=f"content_hash = '{digest}'")
        if stored.num_rows:
            hits = index.search(index.vector(stored["id"][0].as_py())[None, :], args.k, where=args.where)[0]
        else:
            index, encoder = open_for_query(args.store_dir, args.device)
            hits = search(index, encoder, Query(image=read_image(args.image), k=args.k, where=args.where))
    emit(index, hits, args)


if __name__ == "__main__":
    main()
