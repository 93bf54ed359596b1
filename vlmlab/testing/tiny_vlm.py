"""Build, briefly train and save a tiny Qwen2-VL that works offline: ``vlmlab vlm tiny --out DIR``.

No weights can be downloaded here, yet the VLM laboratory needs a model with some visual grounding
to evaluate, fine-tune and serve. ``build_tiny_vlm(out)`` makes a ~0.5M-parameter
``Qwen2VLForConditionalGeneration`` from a ``Qwen2VLConfig`` (a 3-layer language model, a 2-block
vision tower with 8-pixel patches, images resized to 64x64 so each image is 16 tokens), an
in-memory byte-level BPE ``Qwen2Tokenizer`` trained on the scene vocabulary, and a
``Qwen2VLProcessor`` with a Qwen-style chat template. It then trains it on freshly rendered
procedural scenes (:mod:`vlmlab.testing.nlvr`, a seed stream the sample set does not use):

1. vision alignment: the vision tower learns to map each image token onto the word embeddings of
   what it shows (colour and shape, or "empty"), as a VLM's projector is aligned before its LM;
2. grounding: captions of image pairs ("Left: a red circle and two blue squares. Right: ..."),
   short questions about one image ("How many shapes are in the left image?" -> "two"), and
   text-only statements about numbers answered True/False, so the answer format is known.

It never sees an NLVR statement about images, so zero-shot NLVR accuracy stays near chance until a
LoRA fine-tune teaches the task. The directory loads with ``AutoModelForImageTextToText`` /
``AutoProcessor.from_pretrained(DIR)`` — the same path as ``Qwen/Qwen2-VL-2B-Instruct`` — and so
through ``vlmlab.backends.qwen2_vl.load_vlm(DIR)``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlmlab.testing import nlvr

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2's pre-tokenizer (transformers' Qwen2Tokenizer uses the same split before byte-level BPE)
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2-VL's chat template, trimmed: a default system turn, images and text in user turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DESCRIBE = "Describe the two images."
EMPTY_WORD = "empty"


@dataclass(frozen=True)
class TinyVlmConfig:
    """Architecture and training budget of the tiny VLM."""

    hidden_size: int = field(default=96, metadata={"help": "language model width (= vision output width)"})
    layers: int = field(default=3, metadata={"help": "language model layers"})
    heads: int = field(default=6, metadata={"help": "attention heads (head width 16)"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads (grouped-query attention)"})
    vision_width: int = field(default=64, metadata={"help": "vision tower width"})
    vision_depth: int = field(default=2, metadata={"help": "vision tower blocks"})
    patch_size: int = field(default=8, metadata={"help": "vision patch edge in pixels (merged 2x2 into a token)"})
    image_edge: int = field(default=64, metadata={"help": "images are resized to about this edge"})
    vocab_size: int = field(default=512, metadata={"help": "byte-level BPE vocabulary size"})
    scenes: int = field(default=1500, metadata={"help": "procedural scene pairs rendered for training"})
    align_steps: int = field(default=150, metadata={"help": "vision alignment steps (64 images each)"})
    steps: int = field(default=300, metadata={"help": "grounding steps (16 pairs each)"})
    caption_fraction: float = field(default=0.8, metadata={"help": "share of grounding examples that are captions"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate"})
    seed: int = field(default=0, metadata={"help": "seed for init, scenes and sampling"})


# --------------------------------------------------------------------------- tokenizer and processor


def _corpus(rng: np.random.Generator) -> list[str]:
    from vlmlab.nlvr import DEFAULT_PROMPT, format_prompt

    texts = [format_prompt(DEFAULT_PROMPT, nlvr.random_statement(rng).sentence) for _ in range(300)]
    texts += [nlvr.describe_pair(nlvr.random_scene(rng), nlvr.random_scene(rng)) for _ in range(300)]
    texts += [question(rng, nlvr.random_scene(rng), nlvr.random_scene(rng))[0] for _ in range(200)]
    texts += [number_statement(rng)[0] for _ in range(100)]
    texts += ["True", "False", "yes", "no", " " + EMPTY_WORD, DESCRIBE, "You are a helpful assistant.",
              "system\nuser\nassistant\n"] * 20
    return texts


def build_tokenizer(cfg: TinyVlmConfig):
    """A byte-level BPE ``Qwen2Tokenizer`` trained in memory on the scene and prompt vocabulary."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(np.random.default_rng([cfg.seed, 1])), trainer)
    state = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=[tuple(m) for m in state["merges"]],
                               eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    for word in ("True", "False"):  # scored as single tokens at the answer position
        if len(tokenizer(word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"tiny tokenizer splits {word!r}; raise vocab_size")
    return tokenizer


def build_processor(cfg: TinyVlmConfig, tokenizer):
    """``Qwen2VLProcessor`` with small images (about ``image_edge`` pixels a side) and the chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = {"patch_size": cfg.patch_size, "merge_size": 2, "temporal_patch_size": 2,
             "min_pixels": (cfg.patch_size * 4) ** 2, "max_pixels": cfg.image_edge ** 2}
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)


def build_model(cfg: TinyVlmConfig, tokenizer):
    """A randomly initialised tiny ``Qwen2VLForConditionalGeneration`` matching ``tokenizer``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = cfg.hidden_size // cfg.heads
    half = head_dim // 2  # M-RoPE splits the rotary half-width over (time, height, width)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": cfg.hidden_size,
                     "intermediate_size": 2 * cfg.hidden_size, "num_hidden_layers": cfg.layers,
                     "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
                     "max_position_embeddings": 2048, "rope_theta": 10000.0,
                     "rope_scaling": {"type": "mrope", "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": cfg.vision_depth, "embed_dim": cfg.vision_width, "hidden_size": cfg.hidden_size,
                       "num_heads": cfg.vision_width // 16, "mlp_ratio": 2, "patch_size": cfg.patch_size,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    return Qwen2VLForConditionalGeneration(config)


# --------------------------------------------------------------------------- training tasks


def question(rng: np.random.Generator, left: nlvr.Scene, right: nlvr.Scene) -> tuple[str, str]:
    """A short question about one image of a pair and its one-word-ish answer."""
    side = str(rng.choice(nlvr.SIDES))
    scene = left if side == "left" else right
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return f"How many shapes are in the {side} image?", nlvr.NUMBERS[len(scene)]
    if kind == 1:
        colours = sorted({o[0] for o in scene}, key=list(nlvr.COLOURS).index)
        return f"What colours are in the {side} image?", " and ".join(colours)
    shapes = sorted({o[1] for o in scene}, key=nlvr.SHAPES.index)
    return f"What shapes are in the {side} image?", " and ".join(shapes)


def number_statement(rng: np.random.Generator) -> tuple[str, str]:
    """A text-only statement about two numbers in the lab's prompt, answered True/False."""
    from vlmlab.nlvr import DEFAULT_PROMPT, format_prompt

    a, b = (int(v) for v in rng.integers(0, 4, 2))
    relation = str(rng.choice(["more", "fewer"]))
    holds = a > b if relation == "more" else a < b
    sentence = f"{nlvr.NUMBERS[a].capitalize()} is {relation} than {nlvr.NUMBERS[b]}."
    return format_prompt(DEFAULT_PROMPT, sentence), "True" if holds else "False"


def _chat(processor, text: str) -> str:
    # the layout VLM.chat_text uses: the text, then the two images
    content = [{"type": "text", "text": text}, {"type": "image"}, {"type": "image"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def _sft(processor, prompts: list[str], answers: list[str], images: list) -> dict[str, torch.Tensor]:
    tokenizer = processor.tokenizer
    texts = [_chat(processor, p) + a + tokenizer.eos_token for p, a in zip(prompts, answers)]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], -100)
    for row, answer in enumerate(answers):
        n = len(tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        labels[row, -n:] = enc["input_ids"][row, -n:]
    enc["labels"] = labels
    return enc


def _token_targets(scene: nlvr.Scene, word_ids: dict[str, int], vocab: int, grid: int) -> torch.Tensor:
    """Per image token: half the mass on its object's colour word and half on its shape word, or on 'empty'."""
    target = torch.zeros(grid * grid, vocab)
    objects = {place: (colour, shape) for colour, shape, place in scene}
    for k in range(grid * grid):
        place = (k // grid) // (grid // 2) * 2 + (k % grid) // (grid // 2)  # the 2x2 cell the token lies in
        if place in objects:
            target[k, word_ids[objects[place][0]]] = 0.5
            target[k, word_ids[objects[place][1]]] = 0.5
        else:
            target[k, word_ids[EMPTY_WORD]] = 1.0
    return target


def train_tiny_vlm(cfg: TinyVlmConfig) -> tuple[torch.nn.Module, object, dict]:
    """Build and train the tiny VLM; returns (model, processor, report with losses and grounding check)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2])
    tokenizer = build_tokenizer(cfg)
    processor = build_processor(cfg, tokenizer)
    model = build_model(cfg, tokenizer)
    started = time.time()
    pairs = []
    for i in range(cfg.scenes):
        scene_rng = np.random.default_rng([cfg.seed, 31, i])  # not the sample set's stream ([seed, 23, set])
        left, right = nlvr.random_scene(scene_rng), nlvr.random_scene(scene_rng)
        pairs.append((left, right, nlvr.render_scene(left, scene_rng), nlvr.render_scene(right, scene_rng)))
    report: dict = {"render_seconds": round(time.time() - started, 1)}

    # 1. vision alignment: image tokens onto the word embeddings of what they show
    embeddings = model.get_input_embeddings().weight
    word_ids = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
                for w in [*nlvr.COLOURS, *nlvr.SHAPES, EMPTY_WORD]}
    images = [(p[0], p[2]) for p in pairs] + [(p[1], p[3]) for p in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5 * cfg.lr)
    for _ in range(cfg.align_steps):
        idx = rng.choice(len(images), 64)
        pixels = processor.image_processor(images=[images[i][1] for i in idx], return_tensors="pt")
        tokens = model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output
        tokens = torch.cat(list(tokens)) if isinstance(tokens, (list, tuple)) else tokens
        grid = int(pixels["image_grid_thw"][0, 1]) // 2
        target = torch.stack([_token_targets(images[i][0], word_ids, embeddings.shape[0], grid) for i in idx])
        logits = tokens.view(len(idx), grid * grid, -1) @ embeddings.T
        loss = -(target * logits.log_softmax(-1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report["align_loss"] = round(loss.item(), 4)

    # 2. grounding: captions, questions about one image, text-only True/False statements
    def task(left: nlvr.Scene, right: nlvr.Scene) -> tuple[str, str]:
        u = rng.random()
        if u < cfg.caption_fraction:
            return DESCRIBE, nlvr.describe_pair(left, right)
        if u < 0.9:
            return question(rng, left, right)
        return number_statement(rng)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    model.train()
    for _ in range(cfg.steps):
        idx = rng.choice(len(pairs), 16)
        tasks = [task(pairs[i][0], pairs[i][1]) for i in idx]
        batch = _sft(processor, [t for t, _ in tasks], [a for _, a in tasks], [im for i in idx for im in pairs[i][2:]])
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    report["final_loss"] = round(loss.item(), 4)
    report.update(grounding_check(model, processor, cfg))
    report["train_seconds"] = round(time.time() - started, 1)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    return model, processor, report


@torch.no_grad()
def grounding_check(model, processor, cfg: TinyVlmConfig, n: int = 48) -> dict:
    """Caption loss on held-out scenes with their own images vs with another pair's: lower means grounded."""
    pairs = []
    for i in range(n):
        r = np.random.default_rng([cfg.seed, 37, i])
        left, right = nlvr.random_scene(r), nlvr.random_scene(r)
        pairs.append((left, right, nlvr.render_scene(left, r), nlvr.render_scene(right, r)))
    captions = [nlvr.describe_pair(p[0], p[1]) for p in pairs]

    def loss(order: list[int]) -> float:
        batch = _sft(processor, [DESCRIBE] * n, captions, [im for i in order for im in pairs[i][2:]])
        return round(float(model(**batch).loss), 4)

    return {"caption_loss": loss(list(range(n))), "caption_loss_shuffled_images": loss(list(range(n))[::-1])}


def build_tiny_vlm(out: str | Path, cfg: TinyVlmConfig = TinyVlmConfig()) -> dict:
    """Train the tiny VLM and save it (model, processor, tokenizer, ``tiny_vlm_report.json``) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor, report = train_tiny_vlm(cfg)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report["config"] = asdict(cfg)
    (out / "tiny_vlm_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    """``vlmlab vlm tiny --out DIR``: build, train briefly and save the offline tiny Qwen2-VL."""
    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab vlm tiny", description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory to save the model into")
    add_config_arguments(parser, TinyVlmConfig)
    args = parser.parse_args(argv)
    report = build_tiny_vlm(args.out, config_from_args(TinyVlmConfig, args))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
