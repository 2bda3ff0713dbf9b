"""Token-level maps of the ViT image encoder: Grad-CAM, last-layer CLS attention and attention rollout.

All three read activations of the vision tower through forward hooks while the ordinary pixel-space encoder
(:func:`hf_clip_aft.modeling.encode_images`) runs, so the normalisation and the forward pass stay in one place. They
return maps on the patch grid ``(B, H / patch, W / patch)``; :func:`hf_clip_aft.interpret.saliency.saliency`
upsamples them to the image.

Attention weights exist only with ``attn_implementation="eager"`` (SDPA and flash attention never materialise
them): load the model with ``CLIPModel.from_pretrained(..., attn_implementation="eager")``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..modeling import EmbedFn, vision_transformer
from .faithfulness import ScoreFn


def patch_grid(model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
    """``(rows, columns)`` of the patch grid for `pixels` of shape ``(B, 3, H, W)``."""
    patch = vision_transformer(model).config.patch_size
    height, width = pixels.shape[-2:]
    if height % patch or width % patch:
        raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size {patch}.")
    return height // patch, width // patch


@contextmanager
def _recorded_outputs(modules: Sequence[nn.Module]) -> Iterator[list]:
    """Collect the output of each module in `modules`, in call order, for the duration of the block."""
    outputs: list = []
    handles = [m.register_forward_hook(lambda _m, _args, out: outputs.append(out)) for m in modules]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, N)`` patch-token values -> ``(B, rows, columns)``, checking that N matches the grid."""
    if tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"{tokens.shape[1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid.")
    return tokens.reshape(tokens.shape[0], *grid)


def gradcam_grid(score_fn: ScoreFn, model: nn.Module, pixels: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) on ViT patch tokens: ``ReLU(Σ_c α_c A_c)`` on the patch grid.

    ``A`` are the patch tokens after the first LayerNorm of encoder block `layer` (default: the last block), i.e.
    what that block's self-attention reads: in the last block this is the only route by which patch tokens still
    reach the CLS token (the block's patch outputs are never read by the pooled embedding, so their gradient is
    zero). ``α_c`` is the mean over patches of ``∂ score / ∂ A_c``, `score_fn` being the score explained (the class
    similarity, see :func:`hf_clip_aft.interpret.saliency.class_similarity`) computed by `model`. Returns
    ``(B, rows, columns)``, non-negative.
    """
    norm = vision_transformer(model).encoder.layers[layer].layer_norm1
    grid = patch_grid(model, pixels)
    inputs = pixels.detach().requires_grad_(True)  # gives the graph a leaf even when the weights are frozen
    with torch.enable_grad(), _recorded_outputs([norm]) as outputs:
        scores = score_fn(inputs)
        (tokens,) = outputs
        (grads,) = torch.autograd.grad(scores.sum(), tokens)
    patches, patch_grads = tokens[:, 1:].detach(), grads[:, 1:]
    weights = patch_grads.mean(dim=1, keepdim=True)
    cam = (patches * weights).sum(dim=-1).clamp(min=0)
    return _to_grid(cam.float(), grid)


@torch.no_grad()
def attention_weights(embed: EmbedFn, model: nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Self-attention probabilities of every vision encoder block: a list of ``(B, heads, T, T)``, first block first.

    `embed` is the pixel-space encoder of `model` (:func:`hf_clip_aft.modeling.embed_fn`); only its forward pass is
    needed. T = 1 + number of patches (token 0 is CLS). Needs the eager attention implementation.
    """
    tower = vision_transformer(model)
    implementation = tower.config._attn_implementation
    if implementation != "eager":
        raise ValueError(
            f"Attention maps need attn_implementation='eager'; the model uses {implementation!r}. Load it with "
            "CLIPModel.from_pretrained(path, attn_implementation='eager')."
        )
    with _recorded_outputs([layer.self_attn for layer in tower.encoder.layers]) as outputs:
        embed(pixels)
    return [weights.float() for _, weights in outputs]


def cls_attention_grid(attentions: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Last block's attention from CLS to each patch, averaged over heads: ``(B, rows, columns)``."""
    return _to_grid(attentions[-1][:, :, 0, 1:].mean(dim=1), grid)


def attention_rollout(attentions: Sequence[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): ``(B, T, T)`` token-to-token flow through all blocks.

    Each block's attention is averaged over heads, mixed with the identity for the residual connection
    (``(1 − residual) · A + residual · I``), its rows renormalised, and the blocks multiplied from the first to the
    last (``R = Ã_L ⋯ Ã_1``). Every row of the result is a probability distribution over the input tokens (sums
    to 1). Row 0 is the CLS token's rollout.
    """
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual={residual} must lie in [0, 1].")
    rollout = None
    for weights in attentions:
        mixed = weights.float().mean(dim=1)
        eye = torch.eye(mixed.shape[-1], device=mixed.device, dtype=mixed.dtype)
        mixed = (1 - residual) * mixed + residual * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the attention of at least one block.")
    return rollout


def rollout_grid(attentions: Sequence[torch.Tensor], grid: tuple[int, int], residual: float = 0.5) -> torch.Tensor:
    """The CLS row of :func:`attention_rollout` over the patch tokens: ``(B, rows, columns)``."""
    return _to_grid(attention_rollout(attentions, residual)[:, 0, 1:], grid)
