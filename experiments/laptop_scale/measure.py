"""Evaluation of one tower on the test scenes, with the library's evaluation suite (:mod:`hf_clip_aft.interpret`).

The saliency method is Simple Gradient (|∂ cos(f(x), t_y) / ∂ x|, max over colour channels) for the true class's
embedding t_y. Metrics (means over the images):

- ``energy_pointing_game`` (primary, ↑): share of the map's mass on the object mask;
- ``pointing_game`` (↑): share of maps whose maximum lies on the object;
- ``gini`` (↑): sparsity of the map;
- ``deletion_auc`` (↓): class similarity as the top pixels are blacked out (20 steps; skipped when
  ``faithfulness=False``);
- ``accuracy`` (↑): zero-shot top-1 against the class embeddings;
- ``robust_accuracy`` (↑): the same under the label-free L∞ embedding attack of radius ε (``attack_steps`` steps
  of ε/4), a check that the fine-tuning changed what it is meant to change;
- ``attack_cosine`` (↑): mean cosine between each image's embedding under that attack and its clean embedding (how
  brittle the tower is: 1 = the attack cannot move it);
- ``embedding_spread`` (↑): 1 − mean pairwise cosine of the clean embeddings (0 = a collapsed, constant encoder).

With ``dense_methods`` (e.g. :data:`SURGERY_METHODS`), every model is also measured with those training-free dense
maps of the true class (``hf_clip_aft.interpret.surgery.dense_maps`` over all class vectors; the towers have no
text tower, so the fixed class vectors are the class text embeddings): ``<metric>@<method>`` for the energy
pointing game, the pointing game and Gini.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import torch
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

from hf_clip_aft.attack import adversarial_perturbation
from hf_clip_aft.interpret import (
    class_similarity,
    curve_auc,
    energy_pointing_game,
    faithfulness_curve,
    gini_index,
    pointing_game,
    saliency,
    zero_shot_predictions,
)
from hf_clip_aft.interpret.monitor import embedding_spread
from hf_clip_aft.modeling import EmbedFn, embed_fn, frozen_parameters

METRIC_NAMES = (
    "energy_pointing_game",
    "pointing_game",
    "gini",
    "deletion_auc",
    "accuracy",
    "robust_accuracy",
    "attack_cosine",
    "embedding_spread",
)
# Training-free dense maps measured besides Simple Gradient when asked (the architecture changed at inference).
SURGERY_METHODS = ("clip_surgery", "naclip")
DENSE_METRIC_NAMES = ("energy_pointing_game", "pointing_game", "gini")
PRIMARY_METRIC = "energy_pointing_game"
HIGHER_IS_BETTER = {name: name != "deletion_auc" for name in METRIC_NAMES}
DELETION_STEPS = 20


def attacked_embeddings(
    embed: EmbedFn, model: CLIPVisionModelWithProjection, pixels: torch.Tensor, eps: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean embeddings and embeddings under the label-free L∞ attack (radius `eps`, `steps` steps of
    eps/4, units of 1/255; random start from torch's global RNG) that pushes each image away from its clean
    embedding: the attack of :func:`hf_clip_aft.interpret.robust_predictions`. `embed` L2-normalises
    (:func:`hf_clip_aft.modeling.embed_fn`), so both are unit vectors."""
    settings = SimpleNamespace(attack_eps=eps, attack_step_size=eps / 4, attack_steps=steps, attack_norm="linf")
    settings.attack_eta = settings.noise_sigma = 0.0  # no penalty, no smoothing: plain L∞ PGD
    with frozen_parameters(model):
        with torch.no_grad():
            clean = embed(pixels)
        adversarial = adversarial_perturbation(embed, pixels, clean, settings)
        with torch.no_grad():
            return clean, embed(adversarial)


def evaluate_tower(
    model: CLIPVisionModelWithProjection,
    image_processor: CLIPImageProcessorPil,
    pixels: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    class_embeds: torch.Tensor,
    robust_eps: float,
    seed: int,
    batch_size: int = 100,
    keep_maps: int = 0,
    attack_steps: int = 10,
    faithfulness: bool = True,
    dense_methods: tuple[str, ...] = (),
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """The metrics of :data:`METRIC_NAMES` (means over the images) and, per map method (``simple_gradient`` and
    each of `dense_methods`), the true-class maps ``(keep_maps, H, W)`` of the first `keep_maps` images.

    Args:
        pixels: ``(N, 3, H, W)`` test images in [0, 1]; masks: ``(N, H, W)`` boolean object masks.
        labels: ``(N,)`` class indices; class_embeds: ``(C, D)`` unit class vectors.
        robust_eps: radius of the robustness check, in units of 1/255; attack_steps: its PGD steps.
        seed: seeds the attack's random starts (the same for every model evaluated with the same seed).
        faithfulness: compute ``deletion_auc`` (the slowest metric).
        dense_methods: also measure these dense map methods (``<metric>@<method>``, see the module docstring).
    """
    model.eval()
    embed = embed_fn(model, image_processor)
    names = [name for name in METRIC_NAMES if faithfulness or name != "deletion_auc"]
    names += [f"{name}@{method}" for method in dense_methods for name in DENSE_METRIC_NAMES]
    values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    clean_embeds = []
    kept: dict[str, list[torch.Tensor]] = {method: [] for method in ("simple_gradient", *dense_methods)}
    torch.manual_seed(seed)
    for start in range(0, len(pixels), batch_size):
        x, m, y = (t[start : start + batch_size] for t in (pixels, masks, labels))
        clean, adversarial = attacked_embeddings(embed, model, x, robust_eps, attack_steps)
        clean_embeds.append(clean)
        values["accuracy"].append((zero_shot_predictions(clean, class_embeds) == y).float())
        values["robust_accuracy"].append((zero_shot_predictions(adversarial, class_embeds) == y).float())
        values["attack_cosine"].append((clean * adversarial).sum(dim=-1))
        text = class_embeds[y]
        maps = saliency(model, x, text, "simple_gradient", image_processor=image_processor)
        values["energy_pointing_game"].append(energy_pointing_game(maps, m))
        values["pointing_game"].append(pointing_game(maps, m))
        values["gini"].append(gini_index(maps))
        if faithfulness:
            score = partial(class_similarity, embed, text_embeds=text)
            values["deletion_auc"].append(curve_auc(faithfulness_curve(score, x, maps, "deletion", DELETION_STEPS)))
        kept["simple_gradient"].append(maps[: max(0, keep_maps - start)])
        for method in dense_methods:
            dense = _dense_metrics(values, method, model, image_processor, x, m, y, class_embeds)
            kept[method].append(dense[: max(0, keep_maps - start)])
    values.pop("embedding_spread")
    means = {name: torch.cat(chunks).double().mean().item() for name, chunks in values.items()}
    means["embedding_spread"] = embedding_spread(torch.cat(clean_embeds))
    return {name: means[name] for name in names}, {method: torch.cat(chunks) for method, chunks in kept.items()}


def _dense_metrics(values, method, model, image_processor, x, m, y, class_embeds) -> torch.Tensor:
    """Append the :data:`DENSE_METRIC_NAMES` of `method`'s true-class maps of batch ``(x, m, y)`` to `values`;
    returns those maps ``(B, H, W)``."""
    from hf_clip_aft.interpret.surgery import dense_maps  # optional: only runs that ask for surgery maps need it

    maps = dense_maps(model, x, class_embeds, method=method, image_processor=image_processor)
    maps = maps[torch.arange(len(y)), y]
    values[f"energy_pointing_game@{method}"].append(energy_pointing_game(maps, m))
    values[f"pointing_game@{method}"].append(pointing_game(maps, m))
    values[f"gini@{method}"].append(gini_index(maps))
    return maps
