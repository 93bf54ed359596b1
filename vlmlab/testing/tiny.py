"""Build, briefly train and save a tiny CLIP model that works offline.

Nothing can download weights here, yet tests and the demo need a model with a real text-image
signal. ``build_tiny_model(out)`` makes a ~3.5M-parameter open_clip ViT (custom config), trains
it on the procedural rock tiles of :mod:`vlmlab.testing.samples` for a few hundred steps, and saves it
into one directory in both formats:

- open_clip: ``open_clip_config.json`` + ``open_clip_model.safetensors``
  (``load_model(DIR)`` and ``open_clip:local-dir:DIR``),
- transformers: ``config.json`` + ``model.safetensors`` + tokenizer + image-processor files
  converted from the same weights (``hf:DIR``), so both paths give the same embeddings.

``seed_hub_cache`` places the directory in a Hugging Face cache layout so that
``open_clip:hf-hub:ORG/NAME`` and ``hf:ORG/NAME`` load it with ``HF_HUB_OFFLINE=1``, through the
same hub code a user's download goes through.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmlab.testing.samples import CAPTION_TEMPLATES, ROCK_CLASSES, SamplesConfig, build_samples

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TinyConfig:
    """Architecture and training budget of the tiny model."""

    embed_dim: int = field(default=64, metadata={"help": "joint embedding size"})
    image_size: int = field(default=64, metadata={"help": "input image edge in pixels"})
    patch_size: int = field(default=8, metadata={"help": "ViT patch edge in pixels"})
    vision_width: int = field(default=96, metadata={"help": "ViT width"})
    vision_layers: int = field(default=2, metadata={"help": "ViT blocks"})
    head_width: int = field(default=32, metadata={"help": "attention head width (both towers)"})
    text_width: int = field(default=64, metadata={"help": "text transformer width"})
    text_layers: int = field(default=2, metadata={"help": "text transformer blocks"})
    context_length: int = field(default=32, metadata={"help": "text tokens per caption"})
    steps: int = field(default=300, metadata={"help": "training steps"})
    batch_size: int = field(default=64, metadata={"help": "image-caption pairs per step"})
    lr: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate"})
    seed: int = field(default=0, metadata={"help": "seed for init, sampling and sample data"})


def open_clip_model_cfg(cfg: TinyConfig) -> dict:
    """The open_clip ``model_cfg`` dict of the tiny architecture."""
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "patch_size": cfg.patch_size,
            "head_width": cfg.head_width,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": 49408,
            "width": cfg.text_width,
            "heads": cfg.text_width // cfg.head_width,
            "layers": cfg.text_layers,
        },
    }


def heldout(path: str) -> bool:
    """Whether a sample tile is held out of tiny-model training (one in five, by path hash)."""
    return int(hashlib.sha1(path.encode()).hexdigest(), 16) % 5 == 0


def class_prompt(label: str) -> str:
    """The caption used to score a class in the held-out check: 'a map tile of <description>'."""
    return CAPTION_TEMPLATES[0].format(ROCK_CLASSES[label][0])


def _caption_pool(label: str) -> list[str]:
    from vlmlab.prompts import TEMPLATE_SETS

    phrases = ROCK_CLASSES[label] + [label, f"{label} rock"]
    templates = CAPTION_TEMPLATES + list(TEMPLATE_SETS["rocks"])
    return [t.format(p) for t in templates for p in phrases]


def _load_tiles(samples_dir: Path) -> tuple[list[str], list[str]]:
    import csv

    with open(samples_dir / "tiles.csv") as f:
        rows = list(csv.DictReader(f))
    return [r["path"] for r in rows], [r["label"] for r in rows]


def train_tiny(samples_dir: Path, cfg: TinyConfig) -> tuple[torch.nn.Module, dict]:
    """Train the tiny open_clip model on the sample tiles; return it and a report with held-out accuracy."""
    import open_clip
    from PIL import Image

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_cfg = open_clip_model_cfg(cfg)
    model = open_clip.CLIP(**model_cfg)
    model.visual.image_mean, model.visual.image_std = OPENAI_MEAN, OPENAI_STD
    preprocess = open_clip.image_transform(cfg.image_size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg.context_length)

    paths, labels = _load_tiles(samples_dir)
    names = list(ROCK_CLASSES)
    pixels = torch.stack([preprocess(Image.open(samples_dir / p).convert("RGB")) for p in paths])
    y = torch.tensor([names.index(lab) for lab in labels])
    train_idx = np.array([i for i, p in enumerate(paths) if not heldout(p)])
    test_idx = np.array([i for i, p in enumerate(paths) if heldout(p)])
    pools = {lab: tokenizer(_caption_pool(lab)) for lab in names}

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    start = time.time()
    model.train()
    for _ in range(cfg.steps):
        idx = rng.choice(train_idx, size=cfg.batch_size, replace=len(train_idx) < cfg.batch_size)
        batch = pixels[idx]
        flips = torch.from_numpy(rng.random(len(idx)) < 0.5)
        batch[flips] = batch[flips].flip(-1)
        tokens = torch.stack([pools[names[y[i]]][rng.integers(len(pools[names[y[i]]]))] for i in idx])
        img = F.normalize(model.encode_image(batch), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # several pairs of a batch share a class: every same-class caption is a positive
        same = (y[idx][:, None] == y[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean()) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(pixels[test_idx]), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([class_prompt(n) for n in names])), dim=-1)
        acc = float(((img @ txt.T).argmax(1) == y[test_idx]).float().mean())
    report = {
        "heldout_top1": round(acc, 4),
        "heldout_tiles": int(len(test_idx)),
        "train_tiles": int(len(train_idx)),
        "chance": round(1 / len(names), 4),
        "final_loss": round(float(loss.detach()), 4),
        "train_seconds": round(time.time() - start, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, report


# --------------------------------------------------------------------------- saving


def write_open_clip_dir(model: torch.nn.Module, model_cfg: dict, out: Path) -> None:
    """Save an open_clip model as a local directory ``load_model(DIR)`` reads: its weights
    (``open_clip_model.safetensors``) and ``open_clip_config.json`` with ``model_cfg`` and the
    OpenAI normalisation."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "open_clip_model.safetensors")
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


def hf_clip_config(cfg: TinyConfig):
    """The transformers ``CLIPConfig`` equivalent to the tiny open_clip architecture."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": cfg.text_width,
            "intermediate_size": cfg.text_width * 4,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_width // cfg.head_width,
            "max_position_embeddings": cfg.context_length,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config={
            "hidden_size": cfg.vision_width,
            "intermediate_size": cfg.vision_width * 4,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_width // cfg.head_width,
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
        },
        projection_dim=cfg.embed_dim,
    )


def open_clip_to_hf_state_dict(state: dict[str, torch.Tensor], n_text: int, n_vision: int) -> dict[str, torch.Tensor]:
    """Map an open_clip CLIP state dict onto transformers CLIPModel names.

    open_clip keeps attention as ``nn.MultiheadAttention`` with packed q/k/v (``in_proj_*``) and
    projections as matrices applied on the right; transformers splits q/k/v and uses Linear.
    """
    out: dict[str, torch.Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            s, d = f"{src}.{i}", f"{dst}.{i}"
            q, k, v = state[f"{s}.attn.in_proj_weight"].chunk(3)
            qb, kb, vb = state[f"{s}.attn.in_proj_bias"].chunk(3)
            for name, w, b in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
                out[f"{d}.self_attn.{name}.weight"], out[f"{d}.self_attn.{name}.bias"] = w, b
            pairs = {
                "attn.out_proj": "self_attn.out_proj",
                "ln_1": "layer_norm1",
                "ln_2": "layer_norm2",
                "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2",
            }
            for a, b in pairs.items():
                out[f"{d}.{b}.weight"] = state[f"{s}.{a}.weight"]
                out[f"{d}.{b}.bias"] = state[f"{s}.{a}.bias"]

    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    blocks("transformer.resblocks", "text_model.encoder.layers", n_text)
    out["text_model.final_layer_norm.weight"] = state["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = state["ln_final.bias"]
    out["text_projection.weight"] = state["text_projection"].T
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    out["vision_model.pre_layrnorm.weight"] = state["visual.ln_pre.weight"]
    out["vision_model.pre_layrnorm.bias"] = state["visual.ln_pre.bias"]
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers", n_vision)
    out["vision_model.post_layernorm.weight"] = state["visual.ln_post.weight"]
    out["vision_model.post_layernorm.bias"] = state["visual.ln_post.bias"]
    out["visual_projection.weight"] = state["visual.proj"].T
    out["logit_scale"] = state["logit_scale"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _write_hf_tokenizer(cfg: TinyConfig, out: Path) -> None:
    """Write a transformers CLIP tokenizer equal to open_clip's SimpleTokenizer (same BPE, same ids)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)},
        merges=[tuple(m.split()) for m in merges],
        model_max_length=cfg.context_length,
    )
    tokenizer.save_pretrained(out)


def _write_hf(model: torch.nn.Module, cfg: TinyConfig, out: Path) -> None:
    from transformers import CLIPImageProcessor, CLIPModel

    hf_config = hf_clip_config(cfg)
    hf_model = CLIPModel(hf_config)
    state = open_clip_to_hf_state_dict(model.state_dict(), cfg.text_layers, cfg.vision_layers)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"open_clip -> transformers conversion mismatch: missing={missing} unexpected={unexpected}")
    hf_model.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
        resample=3,  # bicubic, as open_clip
    ).save_pretrained(out)
    _write_hf_tokenizer(cfg, out)


def build_identity(samples_dir: str | Path | None, cfg: TinyConfig) -> dict:
    """What makes two builds the same model: the config, this code and the sample tiles trained on."""
    code = hashlib.sha256(Path(__file__).read_bytes() + Path(__file__).with_name("samples.py").read_bytes())
    tiles = Path(samples_dir) / "tiles.csv" if samples_dir is not None else None
    data = hashlib.sha256(tiles.read_bytes()).hexdigest() if tiles is not None and tiles.is_file() else "generated"
    return {"config": asdict(cfg), "code": code.hexdigest()[:16], "samples": data}


def build_tiny_model(out: str | Path, samples_dir: str | Path | None = None, cfg: TinyConfig = TinyConfig(),
                     rebuild: bool = False) -> dict:
    """Train the tiny model and save it in both formats under ``out``; return the training report.

    ``samples_dir`` is a directory written by ``vlmlab samples``; when omitted, sample tiles are
    generated into a temporary directory with the same seed. A model already built under ``out`` from
    the same config, code and tiles is kept (its report comes back with ``"reused": true``) unless
    ``rebuild``.
    """
    out = Path(out)
    identity = build_identity(samples_dir, cfg)
    report_path = out / "tiny_report.json"
    if not rebuild and report_path.is_file():
        report = json.loads(report_path.read_text())
        if report.get("build") == identity:
            return {**report, "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if samples_dir is None:
            samples_dir = Path(tmp)
            build_samples(samples_dir, SamplesConfig(seed=cfg.seed, scenes=0, synthetic=0))
        model, report = train_tiny(Path(samples_dir), cfg)
    write_open_clip_dir(model, open_clip_model_cfg(cfg), out)
    _write_hf(model, cfg, out)
    report["config"] = asdict(cfg)
    report["build"] = identity
    (out / "tiny_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def seed_hub_cache(model_dir: str | Path, repo_id: str, cache_dir: str | Path) -> Path:
    """Lay ``model_dir`` out as the hub cache entry of ``repo_id`` under ``cache_dir``.

    With ``HF_HUB_CACHE=cache_dir`` and ``HF_HUB_OFFLINE=1``, ``open_clip:hf-hub:REPO`` and
    ``hf:REPO`` then resolve through huggingface_hub exactly as a downloaded model would.
    Returns the snapshot directory.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(model_dir.glob("*.json")))).hexdigest()
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / digest
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(digest)
    return snapshot


def main(argv: list[str] | None = None) -> None:
    """``vlmlab tiny --out DIR``: build, train briefly and save the offline tiny CLIP model."""
    from vlmlab.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="vlmlab tiny", description=main.__doc__)
    parser.add_argument("--out", required=True, help="directory to save the model into")
    parser.add_argument("--samples", default=None, help="a `vlmlab samples` directory to train on")
    parser.add_argument("--rebuild", action="store_true", help="train again even if DIR holds this very model")
    add_config_arguments(parser, TinyConfig)
    args = parser.parse_args(argv)
    report = build_tiny_model(args.out, args.samples, config_from_args(TinyConfig, args), rebuild=args.rebuild)
    if report.get("reused"):
        print(f"{args.out} already holds this tiny model (same config, code and tiles); --rebuild trains it again")
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "build")}, indent=2))


if __name__ == "__main__":
    main()
