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
    from vlmlab.index import ensure_index
    from vlmlab.search import Query, add_output_arguments, emit, search, similar, store_encoder
    from vlmlab.store import EmbeddingStore

    parser = argparse.ArgumentParser(prog="vlmlab similar", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help="embedding store (indexed if needed)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", default=None, help="an image file")
    which.add_argument("--id", type=int, default=None, help="id of a store image (as `vlmlab search` prints)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    index = ensure_index(EmbeddingStore.open(args.store_dir))
    if args.id is not None:
        try:
            hits = similar(index, args.id, args.k, where=args.where)
        except KeyError as exc:
            parser.error(str(exc.args[0]))
    else:
        from pathlib import Path

        from vlmlab.images import content_hash, decode_image

        try:
            data = Path(args.image).read_bytes()
        except OSError as exc:
            parser.error(f"cannot read {args.image}: {exc}")
        stored = index.store.read(columns=["id"], where=f"content_hash = '{content_hash(data)}'")
        if stored.num_rows:
            hits = index.search(index.vector(stored["id"][0].as_py())[None, :], args.k, where=args.where)[0]
        else:
            query = Query(image=decode_image(data), k=args.k, where=args.where)
            hits = search(index, store_encoder(index.store, args.device, args.model), query)
    emit(index, hits, args)


if __name__ == "__main__":
    main()
