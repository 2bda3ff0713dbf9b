"""CLIP structure, in one place: the pixel-space image encoder, the towers inside the HF classes, their weights.

Every consumer of the library (the attack, the losses, the trainer, the evaluation suite) sees an image encoder as
a function ``pixels -> embeddings`` with pixels in [0, 1] of shape ``(B, 3, H, W)``, already resized and
centre-cropped by :func:`hf_clip_aft.data.images_to_pixels`. The processor's mean/std normalisation is applied here.

Beside it, what the trainer, the export, the converter, the LLaVA swap and the evaluation share about transformers'
CLIP classes: the state-dict prefixes of each tower, the vision config a `CLIPVisionModelWithProjection` needs, the
vision tower of a `CLIPModel` or of a checkpoint, the ViT under a peft/DDP wrapper, and class-prompt text embeddings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from transformers.utils import logging as transformers_logging

EmbedFn = Callable[[torch.Tensor], torch.Tensor]

# State-dict prefixes of a `CLIPModel` (and of the single-tower classes, which use the same names for their part).
VISION_TRANSFORMER_PREFIX = "vision_model."  # the ViT: `CLIPVisionModel`'s own state dict drops this prefix
VISION_PROJECTION_PREFIX = "visual_projection."
VISION_PREFIXES = (VISION_TRANSFORMER_PREFIX, VISION_PROJECTION_PREFIX)
TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")

# The 7-template ensemble OpenAI selected for ImageNet (CLIP's prompt-engineering notebook): a standard, short
# ensemble that scores close to the full 80-template one.
PROMPT_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


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
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block with `model` in eval mode (dropout off, as an explanation or attack of the model's function
    needs), then give every sub-module back the mode it had, mixed modes included."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


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
        raise ValueError(
            f"{name_or_path} lacks vision weights {sorted(info['missing_keys'])}: is it a CLIP checkpoint?"
        )
    return vision


def vision_config_with_projection(config: CLIPConfig) -> CLIPVisionConfig:
    """A copy of a `CLIPConfig`'s vision config that builds the same `CLIPVisionModelWithProjection` head.

    `CLIPModel` sizes ``visual_projection`` from the top-level ``projection_dim``; `CLIPVisionModelWithProjection`
    reads it from the vision config, which some checkpoints' configs omit (and then default to 512).
    """
    vision_config = copy.deepcopy(config.vision_config)
    vision_config.projection_dim = config.projection_dim
    return vision_config


def vision_tower_of(clip: CLIPModel) -> CLIPVisionModelWithProjection:
    """A `CLIPVisionModelWithProjection` holding a copy of a `CLIPModel`'s vision tower and visual projection."""
    config = vision_config_with_projection(clip.config)
    config._name_or_path = clip.config._name_or_path
    vision = CLIPVisionModelWithProjection(config).to(dtype=clip.dtype)
    state = {k: v for k, v in clip.state_dict().items() if k.startswith(VISION_PREFIXES)}
    vision.load_state_dict(state, strict=True)
    return vision


def vision_transformer(model: nn.Module) -> CLIPVisionModel:
    """The ViT image tower (`CLIPVisionModel`) inside `model`: a `CLIPModel`, `CLIPVisionModelWithProjection`, a
    `CLIPVisionModel`, or any wrapper of them (peft, DDP)."""
    for module in model.modules():
        if isinstance(module, CLIPVisionModel):
            return module
    raise TypeError(f"{type(model).__name__} holds no CLIPVisionModel; pass a CLIP model with a ViT image tower.")


def _text_embeds(text_model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(text_model, CLIPModel):
        return text_model.get_text_features(**tokens).pooler_output
    return text_model(**tokens).text_embeds


@torch.no_grad()
def class_text_embeddings(
    model: CLIPModel | CLIPTextModelWithProjection,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str] = PROMPT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """L2-normalised prompt-ensemble embeddings ``(C, D)`` (float32, on the model's device) of `class_names`.

    The ensemble of Radford et al. (2021): every template filled with the class name, each text embedding
    L2-normalised, averaged over the templates, and normalised again.

    Args:
        model: a `CLIPModel` or a `CLIPTextModelWithProjection` (its text tower and projection are used).
        tokenizer: the model's tokenizer (``CLIPProcessor.tokenizer``).
        class_names: one name per class, in label order.
        templates: prompt templates, each with one ``{}`` for the class name.
        batch_size: prompts per forward pass.
    """
    if not class_names:
        raise ValueError("class_names is empty; zero-shot classification needs at least one class.")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"Every template needs exactly one '{{}}' for the class name; got {list(templates)!r}.")
    device = next(model.parameters()).device
    prompts = [template.format(name) for name in class_names for template in templates]
    embeds = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="class prompts", leave=False):
        tokens = tokenizer(prompts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
        tokens = {key: value.to(device) for key, value in tokens.items()}
        embeds.append(F.normalize(_text_embeds(model, tokens).float(), dim=-1))
    per_template = torch.cat(embeds).view(len(class_names), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)
