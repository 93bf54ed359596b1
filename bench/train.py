"""LoRA vs full fine-tuning of open_clip ViT-B-32 (random weights): samples/s, peak memory, trainable fraction.

    python bench/train.py [--batch-size 8] [--steps 3]

Both runs take the same contrastive steps (symmetric InfoNCE, AdamW) on random pixels and
captions; LoRA trains peft adapters + projection heads (vlmlab.adapters.add_lora), full trains
every weight. Peak memory is the process's peak RSS growth during the run on CPU (CUDA peak
allocation on GPU). Prints the figures and ratios and appends one JSON line to bench/results.jsonl.
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from training.losses import contrastive_loss
from vlmlab.adapters import add_lora
from vlmlab.models import load_model

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results.jsonl"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(lora: bool, batch_size: int, steps: int) -> dict:
    """Train ``steps`` steps and return samples/s, peak-memory growth and the trainable fraction."""
    torch.manual_seed(0)
    encoder = load_model("open_clip:ViT-B-32", dtype=torch.float32)
    if lora:
        add_lora(encoder.model, encoder.backend, rank=8, alpha=16)
    encoder.model.train()
    params = [p for p in encoder.model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in encoder.model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    pixels = torch.randn(batch_size, 3, 224, 224)
    tokens = encoder.tokenize([f"an aerial tile number {i}" for i in range(batch_size)])
    if encoder.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory_mb(encoder.device)
    start = None
    for step in range(steps + 1):  # step 0 warms up and is not timed
        if step == 1:
            start = time.perf_counter()
        loss, _ = contrastive_loss(encoder.image_features(pixels), encoder.text_features(tokens),
                                   encoder.model.logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"samples_per_s": round(batch_size * steps / seconds, 2), "peak_mem_mb": round(peak_memory_mb(
        encoder.device) - before, 1), "trainable_fraction": sum(p.numel() for p in params) / total}


def main() -> None:
    """Run both, print figures and ratios, append the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    # LoRA first: RSS peaks only grow, so the smaller run must come before the larger one
    lora = measure(True, args.batch_size, args.steps)
    full = measure(False, args.batch_size, args.steps)
    row = {"bench": "train", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": "open_clip:ViT-B-32",
           "batch_size": args.batch_size, "steps": args.steps, "lora": lora, "full": full,
           "speedup_lora_vs_full": round(lora["samples_per_s"] / full["samples_per_s"], 3),
           "memory_ratio_lora_vs_full": round(lora["peak_mem_mb"] / max(full["peak_mem_mb"], 1e-9), 3),
           "trainable_fraction_lora": round(lora["trainable_fraction"], 5)}
    print(json.dumps(row, indent=1))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
