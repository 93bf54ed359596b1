"""Training losses for the CLIP-family trainers.

All losses take unnormalised or normalised features as documented per function and return a
scalar tensor that keeps gradients. Shapes: B = batch, D = embedding size, T = text tokens,
P = image patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    logit_scale: torch.Tensor,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE (CLIP loss) over a batch of matching image-text pairs.

    ``image_embeddings``/``text_embeddings``: (B, D), normalised here. ``logit_scale`` is the
    learnable log-temperature (a parameter, so the temperature trains); it is clamped at
    log(100) as in CLIP. ``sample_weights`` (B,) re-weight each pair's two cross-entropy terms
    (rare-class weighting) and are normalised to mean 1. Returns the loss and batch accuracies
    ``acc_i2t``/``acc_t2i`` (fraction of rows whose best match is the diagonal).
    """
    img = F.normalize(image_embeddings.float(), dim=-1)
    txt = F.normalize(text_embeddings.float(), dim=-1)
    scale = logit_scale.float().clamp(max=4.6052).exp()
    logits = scale * img @ txt.t()
    target = torch.arange(len(img), device=img.device)
    loss_i2t = F.cross_entropy(logits, target, reduction="none")
    loss_t2i = F.cross_entropy(logits.t(), target, reduction="none")
    per_pair = (loss_i2t + loss_t2i) / 2
    if sample_weights is not None:
        weights = sample_weights.to(per_pair)
        per_pair = per_pair * weights / weights.mean()
    with torch.no_grad():
        acc_i2t = (logits.argmax(1) == target).float().mean().item()
        acc_t2i = (logits.argmax(0) == target).float().mean().item()
    return per_pair.mean(), {"acc_i2t": acc_i2t, "acc_t2i": acc_t2i}


def rare_class_weights(labels: Sequence[str | None], rare_weight: float = 2.0) -> dict[str, float]:
    """Per-class loss weights from class frequencies: ``clip(mean_count / count, 1, rare_weight)``.

    Common classes weigh 1, a class k times rarer than average weighs k up to ``rare_weight``.
    Unlabelled pairs (None/"") are left out and weigh 1 at use.
    """
    counts: dict[str, int] = {}
    for label in labels:
        if label:
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return {}
    mean_count = sum(counts.values()) / len(counts)
    return {label: min(max(mean_count / count, 1.0), rare_weight) for label, count in counts.items()}


def fine_grained_loss(
    patch_tokens: torch.Tensor,
    word_tokens: torch.Tensor,
    word_mask: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """FILIP-style token-patch alignment loss (symmetric InfoNCE on late-interaction similarities).

    ``patch_tokens`` (B, P, D) and ``word_tokens`` (B, T, D) are projected into the joint space
    (normalised here); ``word_mask`` (B, T) is 1 on real words (not padding/special tokens).
    Image-to-text similarity of image i and text j = mean over i's patches of the best-matching
    word of j; text-to-image = mean over j's words of the best-matching patch of i.
    """
    patches = F.normalize(patch_tokens.float(), dim=-1)
    words = F.normalize(word_tokens.float(), dim=-1)
    mask = word_mask.float()
    # token similarities for every (image, text) pair: (B_img, B_txt, P, T)
    sims = torch.einsum("ipd,jtd->ijpt", patches, words)
    neg = torch.finfo(sims.dtype).min
    masked = sims.masked_fill(mask[None, :, None, :] == 0, neg)
    i2t = masked.max(dim=3).values.mean(dim=2)
    best_patch = sims.max(dim=2).values  # (B_img, B_txt, T)
    t2i = (best_patch * mask[None]).sum(-1) / mask.sum(-1).clamp(min=1)[None]
    scale = logit_scale.float().clamp(max=4.6052).exp()
    target = torch.arange(len(patches), device=patches.device)
    return (F.cross_entropy(scale * i2t, target) + F.cross_entropy(scale * t2i.t(), target)) / 2


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: torch.Tensor | float | None = None,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Weighted focal loss (Lin et al. 2017) for single-label classification, averaged over the batch.

    ``logits`` (B, C) unnormalised, ``targets`` (B,) class ids. Each example's cross-entropy
    ``-log p_t`` is scaled by ``alpha_t * (1 - p_t) ** gamma``: ``alpha`` is one float or a (C,)
    tensor of per-class weights (e.g. focal alpha times inverse-frequency class weights), None = 1.
    ``gamma`` = 0 and ``alpha`` = 1 give plain cross-entropy; a larger ``gamma`` down-weights
    examples the model already gets right with confidence, so rare and hard ones dominate.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    log_pt = log_probs.gather(1, targets.long()[:, None]).squeeze(1)
    # (1 - p_t) ** gamma computed as a tensor power: gamma=0 gives exactly 1 (0 ** 0 == 1 in torch)
    modulating = (1 - log_pt.exp()).clamp(min=0) ** gamma
    loss = -modulating * log_pt
    if alpha is not None:
        weights = alpha.to(loss)[targets.long()] if isinstance(alpha, torch.Tensor) else torch.full_like(loss, alpha)
        loss = weights * loss
    return loss.mean()
