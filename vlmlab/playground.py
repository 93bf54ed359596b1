"""Ask a VLM about one or two images and keep every answer: ``vlmlab vlm playground``.

``vlmlab vlm playground --model SPEC [--adapter DIR] --image A [--image B] --prompt TEXT
[--statement] [--max-new-tokens N --temperature T --top-p P --top-k K --num-beams B --seed S]
[--log runs.jsonl]`` prints the answer and appends one JSON line to the log with the model, adapter,
images (paths and SHA-256), prompt, every decoding knob, the answer, p_true (with ``--statement``:
the prompt is a statement judged with the lab's prompt, as evaluation does) and the time taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PlaygroundRequest:
    """One question to a VLM and the knobs it is decoded with."""

    model: str = field(default="", metadata={"help": "VLM spec"})
    adapter: str = field(default="", metadata={"help": "LoRA adapter directory"})
    images: tuple[str, ...] = field(default=(), metadata={"help": "one or two image files, left first"})
    prompt: str = field(default="", metadata={"help": "the question (or, with statement, the statement)"})
    statement: bool = field(default=False, metadata={"help": "judge the prompt as a statement (True/False + p_true)"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens to decode"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy (or beam); > 0 samples"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    top_k: int = field(default=50, metadata={"help": "top-k sampling"})
    num_beams: int = field(default=1, metadata={"help": "beam search width"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="", metadata={"help": "torch device; empty: CUDA when visible"})


def ask(request: PlaygroundRequest, vlm: Any = None) -> dict[str, Any]:
    """Answer ``request`` (loading the model unless ``vlm`` is given); returns the log record."""
    import torch

    from vlmlab.backends.qwen2_vl import load_vlm
    from vlmlab.images import read_image
    from vlmlab.nlvr import DEFAULT_PROMPT, format_prompt, parse_answer
    from vlmlab.nlvr_data import sha256_file

    if not 1 <= len(request.images) <= 2:
        raise ValueError(f"give one or two --image files, got {len(request.images)}")
    if not request.prompt.strip():
        raise ValueError("give a --prompt")
    images = [read_image(p) for p in request.images]
    vlm = vlm or load_vlm(request.model, adapter=request.adapter or None, device=request.device or None)
    torch.manual_seed(request.seed)
    prompt = format_prompt(DEFAULT_PROMPT, request.prompt) if request.statement else request.prompt
    started = time.perf_counter()
    answer = vlm.generate([prompt], [images], request.max_new_tokens, request.temperature, request.top_p,
                          request.top_k, request.num_beams)[0]
    record: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **asdict(request),
                              "images": [str(Path(p).resolve()) for p in request.images],
                              "image_sha256": [sha256_file(p) for p in request.images],
                              "full_prompt": prompt, "answer": answer}
    if request.statement:
        p_true = float(vlm.p_true([prompt], [images])[0])
        record.update(p_true=round(p_true, 6), judged="True" if p_true >= 0.5 else "False",
                      parsed=parse_answer(answer))
    record["seconds"] = round(time.perf_counter() - started, 3)
    return record


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm playground --model SPEC --image A [--image B] --prompt TEXT [knobs] [--log runs.jsonl]``."""
    from vlmlab.backends.qwen2_vl import VLMSpecError
    from vlmlab.images import ImageDecodeError

    parser = argparse.ArgumentParser(prog="vlmlab vlm playground", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="VLM spec")
    parser.add_argument("--adapter", default="", help="LoRA adapter directory")
    parser.add_argument("--image", dest="images", action="append", required=True, help="image file (once or twice)")
    parser.add_argument("--prompt", required=True, help="question, or statement with --statement")
    parser.add_argument("--statement", action="store_true", help="judge the prompt as an NLVR statement")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="")
    parser.add_argument("--log", default="playground.jsonl", help="JSONL log to append to (default: playground.jsonl)")
    args = parser.parse_args(argv)
    request = PlaygroundRequest(model=args.model, adapter=args.adapter, images=tuple(args.images), prompt=args.prompt,
                                statement=args.statement, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                num_beams=args.num_beams, seed=args.seed, device=args.device)
    try:
        record = ask(request)
    except (VLMSpecError, ImageDecodeError, ValueError) as exc:
        print(f"vlmlab vlm playground: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(record) + "\n")
    shown = {k: record[k] for k in ("answer", "p_true", "judged", "seconds") if k in record}
    print(json.dumps(shown))
    print(f"logged to {log.resolve()}")


if __name__ == "__main__":
    main()
