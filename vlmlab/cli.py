"""The ``vlmlab`` command line: a table of verbs, each dispatched lazily to a module's ``main``.

Every verb is also ``python -m <module>`` (so ``ray job submit -- python -m pipelines.extract``
runs the same code), and every ``main`` is a thin shell over a library function. Nothing heavy
is imported until a verb is chosen, so ``vlmlab --help`` is instant.
"""

from __future__ import annotations

import importlib
import sys

# verb -> (module whose main(argv) runs it, one-line description). Two-word verbs ("train lora")
# are matched before one-word ones.
VERBS: dict[str, tuple[str, str]] = {
    "samples": ("vlmlab.samples", "write deterministic procedural sample data (tiles, scenes, photos)"),
    "tiny": ("vlmlab.tiny", "build, briefly train and save the offline tiny CLIP model"),
    "demo": ("pipelines.demo", "run the main job end to end on sample data"),
}


def usage() -> str:
    """The help text listing every verb."""
    width = max(len(v) for v in VERBS)
    lines = ["usage: vlmlab VERB [args...]   (vlmlab VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {desc}" for verb, (_, desc) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``vlmlab VERB ...`` to the verb's module."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    for n in (2, 1):
        verb = " ".join(argv[:n])
        if len(argv) >= n and verb in VERBS:
            module = importlib.import_module(VERBS[verb][0])
            module.main(argv[n:])
            return
    print(f"vlmlab: unknown verb {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
