"""The pixel-space image encoder: normalisation inside the model, so that attacks and saliency live in [0, 1].

Every consumer of the library (the attack, the losses, the trainer, the evaluation suite) sees an image encoder as
a function ``pixels -> embeddings`` with pixels in [0, 1] of shape ``(B, 3, H, W)``, already resized and
centre-cropped by :func:`hf_clip_aft.data.images_to_pixels`. The processor's mean/std normalisation is applied here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, CLIPVisionModelWithProjection
from transformers.utils import logging as transformers_logging

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


def encode_images(
    model: nn.Module,
    pixels: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    normalize: bool = True,
) -> torch.Tensor:
    """Projected image embeddings (``image_embeds``) of pixels in [0, 1], as float32.

    Args:
        model: a `CLIPVisionModelWithProjection` (possibly wrapped by peft, DDP or FSDP) or a `CLIPModel`.
        pixels: ``(B, 3, H, W)`` in [0, 1], at the model's input resolution.
        image_mean, image_std: the image processor's per-channel normalisation (in [0, 1] units).
        normalize: L2-normalise the embeddings (the paper's setting).
    """
    mean = torch.tensor(image_mean, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    std = torch.tensor(image_std, device=pixels.device, dtype=pixels.dtype).view(1, -1, 1, 1)
    inputs = (pixels - mean) / std
    if isinstance(model, CLIPModel):
        embeds = model.get_image_features(pixel_values=inputs).pooler_output
    else:
        embeds = model(pixel_values=inputs).image_embeds
    embeds = embeds.float()
    return F.normalize(embeds, dim=-1) if normalize else embeds


def embed_fn(model: nn.Module, image_processor, normalize: bool = True) -> EmbedFn:
    """``pixels -> embeddings`` for `model`, normalising with `image_processor`'s mean and std."""
    return partial(
        encode_images,
        model,
        image_mean=image_processor.image_mean,
        image_std=image_processor.image_std,
        normalize=normalize,
    )


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every trainable parameter for the duration of the block.

    During the inner maximisation only the perturbation needs a gradient; with the weights frozen autograd keeps no
    activations for weight gradients, which saves memory and the weight-gradient matmuls of every attack step.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports for a block (skipped text-tower keys are expected, not news)."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def load_vision_tower(name_or_path: str, **kwargs) -> CLIPVisionModelWithProjection:
    """The vision tower and projection of a CLIP checkpoint (a full `CLIPModel` or a vision-only one).

    The text tower's weights are expected to be left over; a missing vision weight is an error, not a warning,
    because it would silently train from a random initialisation.
    """
    with quiet_transformers():
        vision, info = CLIPVisionModelWithProjection.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise ValueError(f"{name_or_path} lacks vision weights {sorted(info['missing_keys'])}: is it a CLIP checkpoint?")
    return vision
