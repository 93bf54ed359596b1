"""VLM laboratory figures: NLVR eval examples/s (logits vs generate, batch 1 vs batched) and train
samples/s (LoRA vs full fine-tune), side by side in one run, with peak memory.

    python bench/vlm.py [--model DIR] [--examples 64] [--batch-size 16] [--steps 10]
    python bench/vlm.py --device cuda     # on a GPU node: Qwen2-VL-2B-shaped random weights in bf16,
                                          # LoRA vs Q-LoRA (4-bit NF4) step time and peak memory

CPU: the tiny Qwen2-VL (``vlmlab vlm tiny``; built into a temporary directory when ``--model`` is
not given) on procedural NLVR pairs. CUDA: a random-weight model with Qwen2-VL-2B-Instruct's
shapes (28 layers of width 1536, a 32-block vision tower of width 1280), saved locally and loaded
through ``load_vlm`` like a downloaded checkpoint, on 448x448 pairs. Every figure comes from the same
run, so ratios are comparable on a noisy machine. Prints the figures and appends one JSON line to
bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results.jsonl"
QWEN2_VL_2B = {  # config.json of Qwen/Qwen2-VL-2B-Instruct (the shapes that matter)
    "text_config": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
                    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pairs(n: int, size: int, seed: int = 5) -> list[tuple[str, list, str]]:
    """``n`` procedural (sentence, [left, right], label) examples rendered at ``size`` pixels."""
    from vlmlab.testing import nlvr

    out = []
    rng = np.random.default_rng(seed)
    while len(out) < n:
        statements, scenes, truths = nlvr.make_set(rng)
        for (left, right), truth in zip(scenes, truths):
            images = [nlvr.render_scene(left, rng, size), nlvr.render_scene(right, rng, size)]
            for statement, holds in zip(statements, truth):
                out.append((statement.sentence, images, "True" if holds else "False"))
    return out[:n]


def eval_rates(vlm, examples, batch_size: int) -> dict:
    """Examples/s of logits scoring and of generation, at batch 1 and at ``batch_size``."""
    from vlmlab.nlvr import DEFAULT_PROMPT, format_prompt

    prompts = [format_prompt(DEFAULT_PROMPT, s) for s, _, _ in examples]
    images = [ims for _, ims, _ in examples]
    vlm.p_true(prompts[:2], images[:2])  # warm-up
    out = {}
    for name, fn in (("logits", lambda bs: vlm.p_true(prompts, images, bs)),
                     ("generate", lambda bs: vlm.generate(prompts, images, max_new_tokens=4, batch_size=bs))):
        for bs in (1, batch_size):
            started = time.perf_counter()
            fn(bs)
            out[f"{name}_batch{bs}_examples_per_s"] = round(len(prompts) / (time.perf_counter() - started), 2)
    out["batched_speedup_logits"] = round(out[f"logits_batch{batch_size}_examples_per_s"]
                                          / out["logits_batch1_examples_per_s"], 2)
    out["logits_over_generate"] = round(out[f"logits_batch{batch_size}_examples_per_s"]
                                        / out[f"generate_batch{batch_size}_examples_per_s"], 2)
    return out


def train_rate(spec: str, examples, batch_size: int, steps: int, method: str, device: torch.device,
               dtype: torch.dtype) -> dict:
    """Samples/s, peak-memory growth and trainable fraction of ``steps`` SFT steps (``method``: full|lora|qlora)."""
    from training.vlm import VlmTrainConfig, add_vlm_lora
    from vlmlab.backends.qwen2_vl import load_vlm
    from vlmlab.nlvr import DEFAULT_PROMPT, format_prompt

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = peak_memory_mb(device)
    vlm = load_vlm(spec, device=device, dtype=dtype, quantization="nf4" if method == "qlora" else None)
    model = vlm.model if method == "full" else add_vlm_lora(vlm, VlmTrainConfig(model=spec, method=method))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = [examples[i * batch_size:(i + 1) * batch_size] for i in range(steps + 1)]
    start = None
    for step, chunk in enumerate(batches):  # step 0 warms up and is not timed
        if step == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        batch = vlm.sft_batch([format_prompt(DEFAULT_PROMPT, s) for s, _, _ in chunk], [ims for _, ims, _ in chunk],
                              [label for _, _, label in chunk])
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {"samples_per_s": round(batch_size * steps / seconds, 2), "step_s": round(seconds / steps, 4),
              "peak_mem_mb": round(peak_memory_mb(device) - (0 if device.type == "cuda" else before), 1),
              "loss": round(float(loss), 4),
              "trainable_fraction": round(sum(p.numel() for p in params) / total, 5)}
    del vlm, model, optimizer
    return result


def save_2b_shaped(out: Path) -> str:
    """Save random weights with Qwen2-VL-2B's shapes (and the tiny VLM's processor) as a local model directory."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from vlmlab.testing.tiny_vlm import TinyVlmConfig, build_processor, build_tokenizer

    tokenizer = build_tokenizer(TinyVlmConfig())
    processor = build_processor(TinyVlmConfig(patch_size=14, image_edge=448), tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                            "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    text = {**QWEN2_VL_2B["text_config"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]}
    config = Qwen2VLConfig(text_config=text, vision_config=QWEN2_VL_2B["vision_config"],
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                           tie_word_embeddings=True, torch_dtype="bfloat16")
    with torch.device("cuda"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return str(out)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and append its JSON line to bench/results.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="tiny VLM directory (default: build one in a temp dir)")
    parser.add_argument("--device", default="cpu", help="cpu (tiny model) or cuda (Qwen2-VL-2B-shaped weights)")
    parser.add_argument("--examples", type=int, default=64, help="eval examples per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="batched eval / train batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed train steps per method")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    record = {"bench": "vlm", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
              "cores": torch.get_num_threads(), "device": torch.cuda.get_device_name() if device.type == "cuda"
              else platform.processor() or "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            spec, dtype, size, methods = save_2b_shaped(Path(tmp) / "qwen2-vl-2b-shaped"), torch.bfloat16, 448, \
                ("lora", "qlora")
            record["model"] = "Qwen2-VL-2B-shaped random weights (bf16)"
        else:
            spec = args.model
            if spec is None:
                from vlmlab.testing.tiny_vlm import build_tiny_vlm

                spec = str(Path(tmp) / "tiny-vlm")
                build_tiny_vlm(spec)
            dtype, size, methods = torch.float32, 96, ("lora", "full")
            record["model"] = "tiny Qwen2-VL (vlmlab vlm tiny)"
        examples = pairs(max(args.examples, args.batch_size * (args.steps + 1)), size)
        from vlmlab.backends.qwen2_vl import load_vlm

        vlm = load_vlm(spec, device=device, dtype=dtype)
        record["parameters"] = sum(p.numel() for p in vlm.model.parameters())
        record["eval"] = eval_rates(vlm, examples[:args.examples], args.batch_size)
        del vlm
        # each method in a fresh process, so one's peak memory does not hide the other's
        ctx = multiprocessing.get_context("spawn")
        record["train"] = {}
        for m in methods:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                record["train"][m] = pool.submit(train_rate, spec, examples, args.batch_size, args.steps, m, device,
                                                 dtype).result()
        a, b = methods
        record["train"][f"{a}_over_{b}_samples_per_s"] = round(record["train"][a]["samples_per_s"]
                                                               / record["train"][b]["samples_per_s"], 2)
    record.update(batch_size=args.batch_size, examples=args.examples, steps=args.steps)
    print(json.dumps(record, indent=1))
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
