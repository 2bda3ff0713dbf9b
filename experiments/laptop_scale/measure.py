"""Evaluation of one tower on the test scenes, with the library's evaluation suite (:mod:`hf_clip_aft.interpret`).

The saliency method is Simple Gradient (|∂ cos(f(x), t_y) / ∂ x|, max over colour channels) for the true class's
embedding t_y. Metrics (means over the test images):

- ``energy_pointing_game`` (primary, ↑): share of the map's mass on the object mask;
- ``pointing_game`` (↑): share of maps whose maximum lies on the object;
- ``gini`` (↑): sparsity of the map;
- ``deletion_auc`` (↓): class similarity as the top pixels are blacked out (20 steps);
- ``accuracy`` (↑): zero-shot top-1 against the class embeddings;
- ``robust_accuracy`` (↑): the same under the label-free L∞ embedding attack of radius ε (10 steps of ε/4), a
  check that the fine-tuning changed what it is meant to change.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from hf_clip_aft.interpret import (
    class_similarity,
    curve_auc,
    energy_pointing_game,
    faithfulness_curve,
    gini_index,
    pointing_game,
    robust_predictions,
    saliency,
    zero_shot_predictions,
)
from hf_clip_aft.modeling import embed_fn

METRIC_NAMES = ("energy_pointing_game", "pointing_game", "gini", "deletion_auc", "accuracy", "robust_accuracy")
PRIMARY_METRIC = "energy_pointing_game"
HIGHER_IS_BETTER = {name: name != "deletion_auc" for name in METRIC_NAMES}
DELETION_STEPS = 20


def evaluate_tower(
    model: CLIPVisionModelWithProjection,
    image_processor: CLIPImageProcessor,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    class_embeds: torch.Tensor,
    robust_eps: float,
    seed: int,
    batch_size: int = 100,
    keep_maps: int = 0,
) -> tuple[dict[str, float], torch.Tensor]:
    """The metrics of :data:`METRIC_NAMES` (means over the images) and the maps of the first `keep_maps` images.

    Args:
        pixels: ``(N, 3, H, W)`` test images in [0, 1]; masks: ``(N, H, W)`` boolean object masks.
        labels: ``(N,)`` class indices; class_embeds: ``(C, D)`` unit class vectors.
        robust_eps: radius of the robustness check, in units of 1/255.
        seed: seeds the attack's random starts (the same for every model evaluated with the same seed).
    """
    model.eval()
    embed = embed_fn(model, image_processor)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in METRIC_NAMES}
    kept = []
    torch.manual_seed(seed)
    for start in range(0, len(pixels), batch_size):
        x, m, y = (t[start : start + batch_size] for t in (pixels, masks, labels))
        with torch.no_grad():
            values["accuracy"].append((zero_shot_predictions(embed(x), class_embeds) == y).float())
        adversarial = robust_predictions(embed, model, x, class_embeds, robust_eps, 10, robust_eps / 4)
        values["robust_accuracy"].append((adversarial == y).float())
        text = class_embeds[y]
        maps = saliency(model, x, text, "simple_gradient", image_processor=image_processor)
        values["energy_pointing_game"].append(energy_pointing_game(maps, m))
        values["pointing_game"].append(pointing_game(maps, m))
        values["gini"].append(gini_index(maps))
        score = partial(class_similarity, embed, text_embeds=text)
        values["deletion_auc"].append(curve_auc(faithfulness_curve(score, x, maps, "deletion", DELETION_STEPS)))
        kept.append(maps[: max(0, keep_maps - start)])
    means = {name: torch.cat(chunks).double().mean().item() for name, chunks in values.items()}
    return means, torch.cat(kept)
