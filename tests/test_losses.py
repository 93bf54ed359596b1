"""training.losses: InfoNCE with learnable temperature, rare-class weights, FILIP token-patch loss."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import contrastive_loss, fine_grained_loss, rare_class_weights


def test_contrastive_loss_is_low_for_matching_pairs_and_trains_the_temperature():
    torch.manual_seed(0)
    feats = torch.randn(8, 16)
    scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    matched, acc = contrastive_loss(feats, feats + 0.01 * torch.randn(8, 16), scale)
    shuffled, acc_bad = contrastive_loss(feats, feats[torch.randperm(8)], scale)
    assert acc == {"acc_i2t": 1.0, "acc_t2i": 1.0}
    assert matched.item() < 0.1 < 1.0 < shuffled.item()
    assert acc_bad["acc_i2t"] < 0.5
    matched.backward()
    assert scale.grad is not None and scale.grad.item() < 0  # sharper temperature lowers a matched loss


def test_sample_weights_scale_each_pairs_term():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(math.log(10.0))
    plain, _ = contrastive_loss(img, txt, scale)
    uniform, _ = contrastive_loss(img, txt, scale, torch.full((4,), 3.0))
    assert uniform.item() == pytest.approx(plain.item(), rel=1e-6)  # weights are normalised to mean 1
    skewed, _ = contrastive_loss(img, txt, scale, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert skewed.item() != pytest.approx(plain.item(), rel=1e-3)


def test_rare_class_weights_follow_inverse_frequency_up_to_the_cap():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10 + [None, ""]
    weights = rare_class_weights(labels, rare_weight=2.0)
    assert weights["a"] == 1.0 and weights["b"] == pytest.approx(100 / 3 / 30)
    assert weights["c"] == 2.0  # 3.3x rarer than average, capped
    assert rare_class_weights([None, ""]) == {}


def test_fine_grained_loss_prefers_aligned_tokens():
    torch.manual_seed(0)
    patches = torch.randn(4, 6, 16)
    words = patches[:, :3] + 0.05 * torch.randn(4, 3, 16)  # each caption's words are some of its patches
    mask = torch.ones(4, 3)
    scale = torch.tensor(math.log(50.0))
    aligned = fine_grained_loss(patches, words, mask, scale)
    mismatched = fine_grained_loss(patches, words[torch.tensor([1, 2, 3, 0])], mask, scale)
    assert aligned.item() < 0.5 < mismatched.item()
    padded = torch.cat([words, torch.randn(4, 2, 16)], dim=1)
    masked = fine_grained_loss(patches, padded, torch.cat([mask, torch.zeros(4, 2)], dim=1), scale)
    assert masked.item() == pytest.approx(fine_grained_loss(patches, words, mask, scale).item(), abs=1e-5)


def test_focal_loss_equals_cross_entropy_at_gamma_0_and_alpha_1():
    from training.losses import focal_loss

    torch.manual_seed(0)
    logits, targets = torch.randn(16, 9), torch.randint(0, 9, (16,))
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert focal_loss(logits, targets, alpha=1.0, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert focal_loss(logits, targets, alpha=None, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    # per-class alpha weighs each example by its class's alpha
    alpha = torch.linspace(0.5, 2.0, 9)
    per_example = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert focal_loss(logits, targets, alpha, 0.0).item() == pytest.approx((alpha[targets] * per_example).mean().item())


def test_focal_loss_down_weights_easy_examples_and_keeps_gradients():
    from training.losses import focal_loss

    # p_t = 0.9 (easy) and 0.1 (hard) with two classes
    easy = torch.tensor([[math.log(9.0), 0.0]])
    hard = torch.tensor([[0.0, math.log(9.0)]])
    target = torch.tensor([0])
    ce_easy, ce_hard = -math.log(0.9), -math.log(0.1)
    assert focal_loss(easy, target, gamma=2.0).item() == pytest.approx(0.1**2 * ce_easy, rel=1e-5)
    assert focal_loss(hard, target, gamma=2.0).item() == pytest.approx(0.9**2 * ce_hard, rel=1e-5)
    # relative to cross-entropy the easy example keeps 1 %, the hard one 81 %
    assert focal_loss(easy, target, gamma=2.0).item() / ce_easy < 0.02 < 0.8 < focal_loss(hard, target).item() / ce_hard
    logits = torch.randn(4, 3, requires_grad=True)
    focal_loss(logits, torch.tensor([0, 1, 2, 0]), torch.tensor([0.25, 1.0, 2.0]), 2.0).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
