"""Saliency maps of a CLIP image encoder for a class prompt: one entry point, :func:`saliency`, for every method.

The score explained is the cosine similarity between the image embedding and the target text embedding (the class
prompt's, see :func:`hf_clip_aft.interpret.zero_shot.class_text_embeddings`). Pixel-gradient methods attribute it
to pixels in [0, 1] (normalisation inside the encoder); token methods work on the ViT patch grid and are upsampled
bilinearly to the image. Every map is non-negative, shape ``(B, H, W)``, at an arbitrary scale (the metrics of
:mod:`hf_clip_aft.interpret.metrics` and :mod:`hf_clip_aft.interpret.faithfulness` are scale-invariant).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling import EmbedFn, embed_fn, frozen_parameters
from .gradients import input_gradients, integrated_gradients, smoothgrad
from .vit_maps import attention_weights, cls_attention_grid, gradcam_grid, patch_grid, rollout_grid

SALIENCY_METHODS = ("simple_gradient", "smoothgrad", "integrated_gradients", "gradcam", "attention", "rollout")
CHANNEL_REDUCTIONS = ("max_abs", "sum_abs")


def class_similarity(embed: EmbedFn, pixels: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(B,)`` of each image's embedding to its target text embedding ``(B, D)`` (L2-normalised).

    This is the score every saliency method explains and the faithfulness curves track.
    """
    return (embed(pixels) * text_embeds.to(device=pixels.device, dtype=torch.float32)).sum(dim=-1)


def reduce_channels(attributions: torch.Tensor, how: str = "max_abs") -> torch.Tensor:
    """Per-pixel saliency ``(B, H, W)`` from per-channel attributions ``(B, 3, H, W)``.

    ``max_abs``: the largest absolute value over the colour channels, Simonyan et al.'s (2014) definition of the
    gradient saliency map and the default; ``sum_abs``: the sum of absolute values (the L1 norm over channels).
    """
    if how == "max_abs":
        return attributions.abs().amax(dim=1)
    if how == "sum_abs":
        return attributions.abs().sum(dim=1)
    raise ValueError(f"channel_reduction={how!r} is not one of {CHANNEL_REDUCTIONS}.")


def upsample(grid_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of patch-grid maps ``(B, rows, columns)`` to ``(B, H, W)``."""
    return F.interpolate(grid_maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def saliency(
    model: nn.Module,
    pixels: torch.Tensor,
    text_embeds: torch.Tensor,
    method: str = "simple_gradient",
    *,
    image_processor,
    channel_reduction: str = "max_abs",
    smoothgrad_samples: int = 25,
    smoothgrad_noise: float = 0.15,
    ig_steps: int = 32,
    gradcam_layer: int = -1,
    rollout_residual: float = 0.5,
) -> torch.Tensor:
    """Saliency maps ``(B, H, W)`` (float32, non-negative) of `model` for each image's target text embedding.

    Args:
        model: a `CLIPModel` or `CLIPVisionModelWithProjection` in eval mode (``attention`` and ``rollout`` need it
            loaded with ``attn_implementation="eager"``).
        pixels: ``(B, 3, H, W)`` in [0, 1] at the model's resolution (:func:`hf_clip_aft.data.images_to_pixels`).
        text_embeds: ``(B, D)`` L2-normalised target text embedding of each image (e.g. ``class_embeds[labels]``).
        method: one of :data:`SALIENCY_METHODS`:
            ``simple_gradient`` (|∂ sim / ∂ x|), ``smoothgrad``, ``integrated_gradients`` (black baseline),
            ``gradcam`` (patch tokens of block `gradcam_layer`), ``attention`` (last block's CLS attention, head
            mean) and ``rollout`` (attention rollout); the last two ignore `text_embeds`.
        image_processor: the model's image processor (its mean and std normalise inside the encoder).
        channel_reduction: how pixel methods aggregate the colour channels (:func:`reduce_channels`).
        smoothgrad_samples, smoothgrad_noise: SmoothGrad's sample count and noise level (share of the pixel range).
        ig_steps: Integrated Gradients' Riemann steps.
        gradcam_layer: index of the encoder block whose input tokens Grad-CAM weights (−1: the last).
        rollout_residual: weight of the identity (residual path) mixed into each block's attention by rollout.

    Stochastic methods (``smoothgrad``) draw from torch's global RNG: seed it for reproducible maps.
    """
    if method not in SALIENCY_METHODS:
        raise ValueError(f"method={method!r} is not one of {SALIENCY_METHODS}.")
    if text_embeds.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"text_embeds has {text_embeds.shape[0]} rows for {pixels.shape[0]} images; pass one target text "
            "embedding per image (e.g. class_embeds[labels])."
        )
    embed = embed_fn(model, image_processor)
    score_fn = partial(class_similarity, embed, text_embeds=text_embeds)
    size = tuple(pixels.shape[-2:])
    # Only the input (or an activation) needs a gradient: frozen weights spare the weight-gradient work and memory.
    with frozen_parameters(model):
        if method == "simple_gradient":
            maps = reduce_channels(input_gradients(score_fn, pixels), channel_reduction)
        elif method == "smoothgrad":
            attributions = smoothgrad(score_fn, pixels, samples=smoothgrad_samples, noise=smoothgrad_noise)
            maps = reduce_channels(attributions, channel_reduction)
        elif method == "integrated_gradients":
            maps = reduce_channels(integrated_gradients(score_fn, pixels, steps=ig_steps), channel_reduction)
        elif method == "gradcam":
            maps = upsample(gradcam_grid(score_fn, model, pixels, layer=gradcam_layer), size)
        else:
            attentions = attention_weights(embed, model, pixels)
            grid = patch_grid(model, pixels)
            if method == "attention":
                maps = upsample(cls_attention_grid(attentions, grid), size)
            else:
                maps = upsample(rollout_grid(attentions, grid, residual=rollout_residual), size)
    return maps.float().clamp(min=0).detach()
