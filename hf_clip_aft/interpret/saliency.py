"""Saliency maps of a CLIP image encoder for a class prompt: one entry point, :func:`saliency`, for every registered
map method (:data:`hf_clip_aft.interpret.registry.MAP_METHODS`); this module registers the gradient and attention
methods.

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
from torch import Tensor, nn

from ..modeling import EmbedFn, embed_fn, eval_mode, frozen_parameters
from .gradients import ScoreFn, input_gradients, integrated_gradients, smoothgrad
from .registry import MAP_METHODS, MapMethod, get_map_method, register_map_method
from .vit_maps import (
    attention_weights,
    cls_attention_grid,
    gradcam_grid,
    patch_grid,
    rollout_grid,
)

CHANNEL_REDUCTIONS = ("max_abs", "sum_abs")


def __getattr__(name: str) -> tuple[str, ...]:
    # SALIENCY_METHODS is a view of the registry, read when asked for, so that methods registered later appear.
    if name == "SALIENCY_METHODS":
        return tuple(MAP_METHODS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _score_fn(model: nn.Module, text_embeds: Tensor, image_processor) -> ScoreFn:
    """``pixels -> (B,)`` class similarity of `model`'s image embeddings to `text_embeds`."""
    return partial(class_similarity, embed_fn(model, image_processor), text_embeds=text_embeds)


# The registered map functions: (model, pixels, text_embeds, *, image_processor, **options) -> (B, H, W); each takes
# the options it knows by name (defaults: those of saliency()) and ignores the rest.
def _simple_gradient(model: nn.Module, pixels: Tensor, text: Tensor, *, image_processor, **options) -> Tensor:
    gradients = input_gradients(_score_fn(model, text, image_processor), pixels)
    return reduce_channels(gradients, options.get("channel_reduction", "max_abs"))


def _smoothgrad(model: nn.Module, pixels: Tensor, text: Tensor, *, image_processor, **options) -> Tensor:
    samples, noise = options.get("smoothgrad_samples", 25), options.get("smoothgrad_noise", 0.15)
    gradients = smoothgrad(_score_fn(model, text, image_processor), pixels, samples=samples, noise=noise)
    return reduce_channels(gradients, options.get("channel_reduction", "max_abs"))


def _integrated_gradients(model: nn.Module, pixels: Tensor, text: Tensor, *, image_processor, **options) -> Tensor:
    steps = options.get("ig_steps", 32)
    gradients = integrated_gradients(_score_fn(model, text, image_processor), pixels, steps=steps)
    return reduce_channels(gradients, options.get("channel_reduction", "max_abs"))


def _gradcam(model: nn.Module, pixels: Tensor, text: Tensor, *, image_processor, **options) -> Tensor:
    score = _score_fn(model, text, image_processor)
    grid = gradcam_grid(score, model, pixels, layer=options.get("gradcam_layer", -1))
    return upsample(grid, tuple(pixels.shape[-2:]))


def _cls_attention(model: nn.Module, pixels: Tensor, text: Tensor, *, image_processor, **options) -> Tensor:
    attentions = attention_weights(embed_fn(model, image_processor), model, pixels)
    return upsample(cls_attention_grid(attentions, patch_grid(model, pixels)), tuple(pixels.shape[-2:]))


def _rollout(model: nn.Module, pixels: Tensor, text: Tensor, *, image_processor, **options) -> Tensor:
    attentions = attention_weights(embed_fn(model, image_processor), model, pixels)
    grid = rollout_grid(attentions, patch_grid(model, pixels), residual=options.get("rollout_residual", 0.5))
    return upsample(grid, tuple(pixels.shape[-2:]))


# name, label, family, needs, function, description
_BUILT_IN = (
    (
        "simple_gradient",
        "Simple Gradient",
        "gradient",
        "gradients",
        _simple_gradient,
        "|d sim / d x| (Simonyan et al., 2014)",
    ),
    (
        "smoothgrad",
        "SmoothGrad",
        "gradient",
        "gradients",
        _smoothgrad,
        "noisy-copy mean gradient (Smilkov et al., 2017)",
    ),
    (
        "integrated_gradients",
        "Integrated Gradients",
        "gradient",
        "gradients",
        _integrated_gradients,
        "IG from black (Sundararajan, 2017)",
    ),
    ("gradcam", "Grad-CAM", "gradient", "gradients", _gradcam, "Grad-CAM on ViT patch tokens (Selvaraju et al., 2017)"),
    ("attention", "CLS attention", "attention", "attentions", _cls_attention, "last block's CLS attention, head mean"),
    ("rollout", "Rollout", "attention", "attentions", _rollout, "attention rollout (Abnar & Zuidema, 2020)"),
)
for _name, _label, _family, _needs, _fn, _description in _BUILT_IN:
    register_map_method(MapMethod(_name, _label, _family, _needs, _description, _fn))


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
    **options,
) -> torch.Tensor:
    """Saliency maps ``(B, H, W)`` (float32, non-negative) of `model` for each image's target text embedding.

    Args:
        model: a `CLIPModel` or `CLIPVisionModelWithProjection` (``attention`` and ``rollout`` need it loaded with
            ``attn_implementation="eager"``). The map is computed in eval mode (dropout off: the same map every
            call) and every sub-module's previous mode is restored.
        pixels: ``(B, 3, H, W)`` in [0, 1] at the model's resolution (:func:`hf_clip_aft.data.images_to_pixels`).
        text_embeds: ``(B, D)`` L2-normalised target text embedding of each image (e.g. ``class_embeds[labels]``).
        method: a registered map method (:data:`hf_clip_aft.interpret.registry.MAP_METHODS`); built in:
            ``simple_gradient`` (|∂ sim / ∂ x|), ``smoothgrad``, ``integrated_gradients`` (black baseline),
            ``gradcam`` (patch tokens of block `gradcam_layer`), ``attention`` (last block's CLS attention, head
            mean) and ``rollout`` (attention rollout); the last two ignore `text_embeds`.
        image_processor: the model's image processor (its mean and std normalise inside the encoder).
        channel_reduction: how pixel methods aggregate the colour channels (:func:`reduce_channels`).
        smoothgrad_samples, smoothgrad_noise: SmoothGrad's sample count and noise level (share of the pixel range).
        ig_steps: Integrated Gradients' Riemann steps.
        gradcam_layer: index of the encoder block whose input tokens Grad-CAM weights (−1: the last).
        rollout_residual: weight of the identity (residual path) mixed into each block's attention by rollout.
        options: further options for other registered methods; every method receives all options and ignores
            those it does not know.

    Stochastic methods (``smoothgrad``) draw from torch's global RNG: seed it for reproducible maps.
    """
    map_method = get_map_method(method)
    if text_embeds.shape[0] != pixels.shape[0]:
        raise ValueError(
            f"text_embeds has {text_embeds.shape[0]} rows for {pixels.shape[0]} images; pass one target text "
            "embedding per image (e.g. class_embeds[labels])."
        )
    options.update(
        channel_reduction=channel_reduction,
        smoothgrad_samples=smoothgrad_samples,
        smoothgrad_noise=smoothgrad_noise,
        ig_steps=ig_steps,
        gradcam_layer=gradcam_layer,
        rollout_residual=rollout_residual,
    )
    # Only the input (or an activation) needs a gradient: frozen weights spare the weight-gradient work and memory.
    with eval_mode(model), frozen_parameters(model):
        maps = map_method.fn(model, pixels, text_embeds, image_processor=image_processor, **options)
    return maps.float().clamp(min=0).detach()
