"""int8 inference on CPU: dynamic quantisation of a CLIP image tower (``load_model(..., dtype="int8")``).

PyTorch's dynamic quantisation stores a Linear layer's weights as int8 and quantises its input
per call, so the matrix product runs on the CPU's int8 units (AVX-512 VNNI, AVX2) with float32
outside. It only reaches ``nn.Linear`` modules: transformers' CLIP/SigLIP attention already uses
them, but open_clip's ``nn.MultiheadAttention`` holds its q/k/v projection as a bare parameter,
a third of a ViT's FLOPs. Its self-attention layers are therefore rebuilt first as
:class:`ProjectedSelfAttention` (same weights, same result, projections as ``nn.Linear``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class ProjectedSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` in inference, for self-attention only, with its input and output
    projections as ``nn.Linear`` (so that dynamic quantisation reaches them) and the attention
    itself through ``scaled_dot_product_attention``. Returns ``(output, None)`` like the original."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        dim = mha.embed_dim
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        self.in_proj = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)

    @staticmethod
    def fits(mha: nn.Module) -> bool:
        """Whether ``mha`` is an attention this class reproduces exactly."""
        return (isinstance(mha, nn.MultiheadAttention) and mha._qkv_same_embed_dim and mha.bias_k is None
                and not mha.add_zero_attn)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                **_: object) -> tuple[torch.Tensor, None]:
        """Self-attention of ``query`` (``key`` and ``value`` must be the same tensor)."""
        if key is not query or value is not query or need_weights or key_padding_mask is not None:
            raise RuntimeError("ProjectedSelfAttention (int8) supports self-attention without weights or "
                               "padding masks only")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, dim = x.shape
        qkv = self.in_proj(x).view(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MultiheadAttention: True = masked; SDPA: True = attends
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def project_self_attention(tower: nn.Module) -> int:
    """Rebuild the self-attention layers of open_clip residual blocks in ``tower`` as
    :class:`ProjectedSelfAttention`, in place; returns how many. Cross-attention blocks (which
    have ``ln_1_kv``) and attentional poolers are left as they are."""
    count = 0
    for block in tower.modules():
        attn = getattr(block, "attn", None)
        if ProjectedSelfAttention.fits(attn) and not hasattr(block, "ln_1_kv") and hasattr(block, "ln_1"):
            block.attn = ProjectedSelfAttention(attn)
            count += 1
    return count


def merge_lora(model: nn.Module) -> int:
    """Merge every peft LoRA layer of ``model`` into its base layer and put the plain base layer
    back in its place (in place); returns how many. Inference then costs what the base model does,
    and the plain layers are what quantisation and :class:`ProjectedSelfAttention` recognise."""
    wrapped = [(name, module) for name, module in model.named_modules()
               if hasattr(module, "lora_A") and hasattr(module, "get_base_layer")]
    for _, module in wrapped:  # outer layers first: merging one merges the layers it wraps
        if not module.merged:
            module.merge()
    for name, module in reversed(wrapped):  # inner layers first, so that outer names still resolve
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())
    return len(wrapped)


def quantize_int8(model: nn.Module, tower: str) -> nn.Module:
    """Dynamically quantise the Linear layers of ``model``'s image tower (the submodule ``tower``, a
    backend's ``vision.module``) to int8, in place.

    Only the image tower: it is where extraction spends its time, and open_clip's text tower reads
    its weights' dtype, which quantised layers no longer have. LoRA layers are merged into their
    base weights first, so an adapter costs nothing at int8. The model is for inference only after.
    """
    image_tower = getattr(model, tower, None)
    if not isinstance(image_tower, nn.Module):
        raise ValueError(f"int8: no image tower {tower!r} in {type(model).__name__}")
    merge_lora(model)
    image_tower = getattr(model, tower)  # merging may have replaced wrapped modules
    with warnings.catch_warnings():
        # torch.ao's eager dynamic quantisation is deprecated in favour of torchao, which is not a
        # dependency here and whose CPU int8 path needs torch.compile; the eager kernels still ship
        warnings.simplefilter("ignore")
        project_self_attention(image_tower)
        torch.ao.quantization.quantize_dynamic(image_tower, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
