"""``vlmlab store verify STORE [--quarantine]``: check every part of an embedding store.

Reads each part's footer, schema and ids (not the embeddings) and lists the ones that cannot be read.
``--quarantine`` moves those to ``STORE/quarantine/`` (nothing is deleted) and refreshes the
manifest's row count; the next ``vlmlab extract`` of the same images embeds the lost rows again.
Exits 1 when unreadable parts remain.
"""

from __future__ import annotations

import argparse
import json

from vlmlab.store import EmbeddingStore


def main(argv: list[str] | None = None) -> None:
    """``vlmlab store verify STORE [--quarantine]``: print the check as JSON; exit 1 if bad parts remain."""
    parser = argparse.ArgumentParser(prog="vlmlab store verify", description=__doc__.split("\n")[0])
    parser.add_argument("store_dir", metavar="STORE", help="embedding store (from `vlmlab extract`)")
    parser.add_argument("--quarantine", action="store_true",
                        help="move unreadable parts to STORE/quarantine/ so every other row reads again")
    args = parser.parse_args(argv)
    report = EmbeddingStore.open(args.store_dir).verify(quarantine=args.quarantine)
    print(json.dumps(report, indent=1))
    if report["bad"] and not report["quarantined"]:
        print(f"{len(report['bad'])} unreadable part(s): run `vlmlab store verify {args.store_dir} --quarantine`")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
