"""The base model: a small CLIP vision tower trained from scratch against fixed class embeddings.

No pre-trained CLIP can be downloaded offline, so the base encoder is made here. Its "text side" is one fixed random
unit vector per class (seeded), standing in for the text embeddings of the class prompts: the vision tower learns
to put each image's projected embedding near its class vector, with CLIP's objective restricted to the image-to-text
direction (cross-entropy of the scaled cosine similarities over the class vectors). Zero-shot accuracy and the
saliency score (cosine similarity to the class vector) are then exactly what they are for a real CLIP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

from hf_clip_aft.modeling import embed_fn


@dataclass(frozen=True)
class TowerSpec:
    """Architecture of the vision tower (pixels, tokens and widths)."""

    image_size: int = 32
    patch_size: int = 8
    width: int = 64
    layers: int = 4
    heads: int = 4
    projection_dim: int = 32


@dataclass(frozen=True)
class PretrainSpec:
    """Optimisation of the base model: AdamW with a cosine schedule after a linear warm-up of `warmup` steps."""

    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    logit_scale: float = 10.0  # fixed inverse temperature of the cosine logits
    noise_std: float = 0.0  # std of Gaussian pixel noise added to every training image, units of 1/255 (0: none)


def build_tower(spec: TowerSpec, seed: int) -> CLIPVisionModelWithProjection:
    """A randomly initialised (seeded) `CLIPVisionModelWithProjection` of the given shape."""
    config = CLIPVisionConfig(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden_size=spec.width,
        intermediate_size=4 * spec.width,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        projection_dim=spec.projection_dim,
    )
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(config)


def image_processor_for(image_size: int) -> CLIPImageProcessorPil:
    """A CLIP image processor (OpenAI mean/std) that keeps `image_size`-pixel square images as they are."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def class_embeddings(num_classes: int, dim: int, seed: int) -> torch.Tensor:
    """``(C, D)`` fixed random unit vectors, one per class: the stand-in for the class prompts' text embeddings."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1)


def _learning_rate(step: int, spec: PretrainSpec) -> float:
    if step < spec.warmup:
        return spec.learning_rate * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def dihedral_augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image under one of the 8 flips/quarter-turns of the square, drawn at random (every class is invariant)."""
    turns = torch.randint(4, (len(pixels),), generator=generator)
    flips = torch.randint(2, (len(pixels),), generator=generator).bool()
    out = torch.where(flips.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
    return torch.stack([torch.rot90(image, int(k), dims=(-2, -1)) for image, k in zip(out, turns)])


def pretrain(
    model: CLIPVisionModelWithProjection,
    image_processor: CLIPImageProcessorPil,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    class_embeds: torch.Tensor,
    spec: PretrainSpec,
    seed: int,
) -> list[float]:
    """Train `model` in place on ``(pixels [0, 1], labels)``; returns the training loss of every step (nats)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay)
    encode = embed_fn(model, image_processor)
    model.train()
    losses = []
    for step in tqdm(range(spec.steps), desc="pre-training", leave=False):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, spec)
        batch = torch.randint(len(pixels), (spec.batch_size,), generator=generator)
        images = dihedral_augment(pixels[batch], generator)
        if spec.noise_std > 0:  # drawn only when asked, so that runs without noise keep their batches exactly
            noise = torch.randn(images.shape, generator=generator) * (spec.noise_std / 255)
            images = (images + noise).clamp(0, 1)
        logits = spec.logit_scale * encode(images) @ class_embeds.t()
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses
