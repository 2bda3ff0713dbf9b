"""The model side: hooks that record unit activations of a CLIP vision tower, and their layouts.

Units (``unit_kind``): ``residual`` — the D channels of a block's output (``hidden_states[i + 1]`` of
``output_hidden_states``); ``mlp`` — the intermediate neurons of the block's `CLIPMLP`, after the activation
function (the input of ``fc2``). Tokens are batch-first ``(B, 1 + h·w, U)``: the CLS token, then the patch grid
in row-major order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ...modeling import encode_images
from .constants import SUMMARIES, UNIT_KINDS


def summarize_tokens(tokens: torch.Tensor, summary: str) -> torch.Tensor:
    """One value per image and unit ``(B, U)`` from token activations ``(B, 1 + h·w, U)``: the CLS token (``cls``) or
    the mean over the patch tokens (``mean``)."""
    if summary == "cls":
        return tokens[:, 0]
    if summary == "mean":
        return tokens[:, 1:].mean(dim=1)
    raise ValueError(f"summary={summary!r} is not one of {SUMMARIES}.")


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Spatial activation maps ``(B, U, h, w)`` from token activations ``(B, 1 + h·w, U)`` of a square patch grid."""
    patches = tokens[:, 1:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid; expected CLS + h·w tokens.")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder blocks of a CLIP vision tower (`CLIPModel`, `CLIPVisionModel[WithProjection]`)."""
    vision = getattr(model, "vision_model", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no vision_model.encoder.layers; pass a transformers CLIP model.")
    return layers


def resolve_layers(layers: Sequence[int], num_layers: int) -> list[int]:
    """Block indices in [0, num_layers), negatives counted from the end, repeats dropped, order kept."""
    resolved = []
    for layer in layers:
        if not -num_layers <= layer < num_layers:
            raise ValueError(
                f"layer {layer} is out of range for a tower with {num_layers} blocks (0 … {num_layers - 1})."
            )
        resolved.append(layer % num_layers)
    return list(dict.fromkeys(resolved))


@contextmanager
def record_units(model: nn.Module, layers: Sequence[int], unit_kind: str) -> Iterator[dict[int, torch.Tensor]]:
    """Hooks that store, for each forward pass, each block's unit activations ``(B, 1 + h·w, U)`` (float32).

    ``residual``: the block's output (transformers 4.x returns it in a tuple, 5.x as a tensor); ``mlp``: the input
    of the block's ``mlp.fc2``, i.e. the MLP neurons after the activation function. The dict is overwritten by each
    forward; the hooks are removed on exit.
    """
    if unit_kind not in UNIT_KINDS:
        raise ValueError(f"unit_kind={unit_kind!r} is not one of {UNIT_KINDS}.")
    blocks = encoder_layers(model)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def keep(layer: int, value: Any) -> None:
        store[layer] = (value[0] if isinstance(value, tuple) else value).detach().float()

    for layer in resolve_layers(layers, len(blocks)):
        if unit_kind == "residual":
            handle = blocks[layer].register_forward_hook(lambda m, args, out, layer=layer: keep(layer, out))
        else:
            handle = blocks[layer].mlp.fc2.register_forward_pre_hook(lambda m, args, layer=layer: keep(layer, args))
        handles.append(handle)
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def unit_tokens(
    model: nn.Module,
    pixels: torch.Tensor,
    image_processor,
    layers: Sequence[int],
    unit_kind: str,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Token activations ``{layer: (B, 1 + h·w, U)}`` of pixels ``(B, 3, H, W)`` in [0, 1], and the normalised
    image embeddings ``(B, D)`` of the same forward pass, in eval mode (the model's mode is restored)."""
    training = model.training
    model.eval()  # dissection describes the deployed encoder: dropout (a LoRA's, a user's model's) off
    try:
        with record_units(model, layers, unit_kind) as store:
            embeds = encode_images(model, pixels, image_processor.image_mean, image_processor.image_std)
            return dict(store), embeds
    finally:
        model.train(training)
