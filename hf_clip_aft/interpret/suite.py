"""The evaluation suite: several CLIP models, one dataset, every requested metric, written side by side.

:func:`evaluate_models` runs it and writes ``results.json`` (schema in :mod:`hf_clip_aft.interpret.results`),
``summary.md`` and ``saliency_grid.png`` to the output folder; ``recipes/evaluate.py`` is its command line. Every
model sees the same images and, batch by batch, the same random draws (SmoothGrad noise, PGD starts), so their
numbers differ only through the weights.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

from ..data import images_to_pixels
from ..modeling import EmbedFn, embed_fn
from .batches import iterate_batches, load_evaluation_data, masks_to_tensor
from .faithfulness import INSERTION_BLUR_SIGMA, curve_auc, faithfulness_curve
from .figures import saliency_grid
from .metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou
from .results import SCHEMA, TASK_SALIENCY, TASK_ZERO_SHOT, save_results, summary_markdown
from .roar import ROAR_FRACTIONS, remove_top_pixels, roar_accuracy, split_indices
from .robustness import robust_predictions
from .saliency import SALIENCY_METHODS, class_similarity, saliency
from .zero_shot import (
    PROMPT_TEMPLATES,
    SINGLE_TEMPLATE,
    class_text_embeddings,
    zero_shot_predictions,
    zero_shot_preset,
)

logger = logging.getLogger(__name__)

# Metric groups of --metrics; "all" means DEFAULT_METRICS (the heavier ROAR and PGD protocols are opt-in).
METRIC_GROUPS = {
    "zero_shot": ("accuracy",),
    "sparsity": ("gini",),
    "localization": ("pointing_game", "energy_pointing_game", "top_k_iou"),
    "faithfulness": ("deletion_auc", "insertion_auc"),
    "roar": ("roar_accuracy",),
    "robustness": ("robust_accuracy",),
}
DEFAULT_METRICS = ("zero_shot", "sparsity", "localization", "faithfulness")
SALIENCY_GROUPS = ("sparsity", "localization", "faithfulness", "roar")
PROMPT_SETS = {"ensemble": PROMPT_TEMPLATES, "single": SINGLE_TEMPLATE}
TARGETS = ("label", "prediction")


@dataclass
class EvaluationArguments:
    """Settings of an evaluation run (the fields of ``recipes/evaluate.py``)."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "CLIPModel folders or Hub ids, base model first, AFT model last."},
    )
    dataset: str = field(default="", metadata={"help": "Hub dataset id or local imagefolder with a ClassLabel column."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(default="test", metadata={"help": "Dataset split."})
    output: str = field(default="eval", metadata={"help": "Output folder for results.json, summary.md, the grid."})
    metrics: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "Metric groups (the results they give): "
            + "; ".join(f"{group} ({', '.join(names)})" for group, names in METRIC_GROUPS.items())
            + ". 'all' = the first four; roar and robustness are heavier and opt-in ('all roar' adds ROAR)."
        },
    )
    methods: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={"help": f"Saliency methods: {', '.join(SALIENCY_METHODS)}; 'all' = every one."},
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate a seeded random subset of this many images."})
    batch_size: int = field(default=16, metadata={"help": "Images per batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset, SmoothGrad noise, PGD starts, ROAR split."})
    device: str | None = field(default=None, metadata={"help": "Torch device; default: accelerate's (GPU if any)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; default: the first Image one."})
    label_column: str = field(default="label", metadata={"help": "ClassLabel column with the class names."})
    mask_column: str | None = field(
        default=None, metadata={"help": "Object-mask column; default: an Image column named mask/segmentation."}
    )
    prompts: Literal["ensemble", "single"] = field(
        default="ensemble", metadata={"help": "Prompt templates: the 7-template ensemble or 'a photo of a {}.'"}
    )
    target: Literal["label", "prediction"] = field(
        default="label", metadata={"help": "Class whose prompt the maps explain: the true label or the prediction."}
    )
    grid_images: int = field(default=4, metadata={"help": "Rows of saliency_grid.png (the first images)."})
    channel_reduction: Literal["max_abs", "sum_abs"] = field(
        default="max_abs", metadata={"help": "Colour-channel aggregation of pixel gradients (Simonyan: max_abs)."}
    )
    smoothgrad_samples: int = field(default=25, metadata={"help": "SmoothGrad noisy samples."})
    smoothgrad_noise: float = field(default=0.15, metadata={"help": "SmoothGrad noise std, share of pixel range."})
    ig_steps: int = field(default=32, metadata={"help": "Integrated Gradients steps."})
    gradcam_layer: int = field(
        default=-1, metadata={"help": "Encoder block whose LayerNorm-ed input tokens Grad-CAM weights (-1: last)."}
    )
    rollout_residual: float = field(default=0.5, metadata={"help": "Identity weight in attention rollout."})
    faithfulness_steps: int = field(default=20, metadata={"help": "Deletion/insertion steps."})
    iou_fraction: float = field(default=0.2, metadata={"help": "Share of top pixels compared with the mask (IoU)."})
    roar_fractions: list[float] = field(
        default_factory=lambda: list(ROAR_FRACTIONS), metadata={"help": "ROAR shares of pixels removed."}
    )
    robust_eps: list[float] = field(default_factory=lambda: [1.0, 4.0], metadata={"help": "PGD radii, units 1/255."})
    attack_steps: int = field(default=10, metadata={"help": "PGD steps of the robustness metric."})
    attack_step_size: float = field(default=1.0, metadata={"help": "PGD step, units of 1/255."})
    zero_shot_preset: str | None = field(
        default=None,
        metadata={"help": "Run zero-shot accuracy on every dataset of this preset (e.g. aft-zero-shot-15) instead."},
    )

    def metric_groups(self) -> list[str]:
        """The metric groups requested, 'all' expanded (``all roar`` adds ROAR to the defaults), in a fixed order."""
        requested = set(self.metrics) - {"all"}
        if "all" in self.metrics:
            requested |= set(DEFAULT_METRICS)
        unknown = requested - set(METRIC_GROUPS)
        if unknown:
            raise ValueError(f"Unknown metric groups {sorted(unknown)}; choose from {list(METRIC_GROUPS)} or 'all'.")
        return [group for group in METRIC_GROUPS if group in requested]

    def saliency_methods(self) -> list[str]:
        """The saliency methods requested, 'all' expanded; none when no saliency metric is requested."""
        if not any(group in SALIENCY_GROUPS for group in self.metric_groups()):
            return []
        methods = list(SALIENCY_METHODS) if "all" in self.methods else list(dict.fromkeys(self.methods))
        unknown = set(methods) - set(SALIENCY_METHODS)
        if unknown:
            raise ValueError(f"Unknown saliency methods {sorted(unknown)}; choose from {SALIENCY_METHODS} or 'all'.")
        return methods

    def check(self) -> None:
        """Raise `ValueError` on settings that cannot run, before any model or dataset is loaded."""
        if not self.models:
            raise ValueError("No models given: pass --models BASE [AFT ...] (CLIPModel folders or Hub ids).")
        if not self.dataset and self.zero_shot_preset is None:
            raise ValueError("No dataset given: pass --dataset (Hub id or imagefolder) or --zero_shot_preset.")
        if self.prompts not in PROMPT_SETS:
            raise ValueError(f"prompts={self.prompts!r} is not one of {list(PROMPT_SETS)}.")
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target!r} is not one of {TARGETS}.")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models={self.models} names a model twice; give each model once.")
        self.saliency_methods()  # validates metrics and methods


@dataclass
class LoadedModel:
    """A model under evaluation: its name as given, the CLIPModel, its processor and pixel-space encoder."""

    name: str
    model: CLIPModel
    processor: CLIPProcessor
    embed: EmbedFn


def load_clip(name_or_path: str, device: str | torch.device) -> LoadedModel:
    """Load a `CLIPModel` and its `CLIPProcessor` in eval mode on `device`, with eager attention.

    Eager attention is what makes attention weights observable (``attention``, ``rollout``); it gives the same
    outputs as SDPA.
    """
    model = CLIPModel.from_pretrained(name_or_path, attn_implementation="eager").to(device).eval()
    processor = CLIPProcessor.from_pretrained(name_or_path)
    return LoadedModel(name_or_path, model, processor, embed_fn(model, processor.image_processor))


@dataclass
class FigureData:
    """What the saliency grid shows: the first images (as the first model sees them), their class names, the maps."""

    pixels: list[torch.Tensor] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    maps: dict[tuple[str, str], list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    def __len__(self) -> int:
        return sum(len(p) for p in self.pixels)


def _result(model: str, metric: str, method: str | None, value: float, settings: dict[str, Any]) -> dict[str, Any]:
    """One entry of the results list (see :mod:`hf_clip_aft.interpret.results`)."""
    task = TASK_ZERO_SHOT if method is None else TASK_SALIENCY
    return {"model": model, "task": task, "metric": metric, "method": method, "value": value, "settings": settings}


class _Accumulator:
    """Per-image metric values, keyed by (model, metric, method, settings): one result per key."""

    def __init__(self) -> None:
        self.values: dict[tuple, list[torch.Tensor]] = defaultdict(list)

    def add(self, model: str, metric: str, method: str | None, values: torch.Tensor, **settings: Any) -> None:
        self.values[model, metric, method, tuple(settings.items())].append(values.detach().float().cpu())

    def results(self) -> list[dict[str, Any]]:
        out = []
        for (model, metric, method, settings), chunks in self.values.items():
            values = torch.cat(chunks)
            if values.numel() == 0:
                continue
            settings = {**dict(settings), "num_images": values.numel()}
            out.append(_result(model, metric, method, values.double().mean().item(), settings))
        return out


def _device(args: EvaluationArguments) -> torch.device:
    return torch.device(args.device) if args.device else PartialState().device


def _map_metrics(
    acc: _Accumulator,
    model: LoadedModel,
    method: str,
    maps: torch.Tensor,
    pixels: torch.Tensor,
    masks: torch.Tensor | None,
    text: torch.Tensor,
    groups: list[str],
    args: EvaluationArguments,
) -> None:
    """Sparsity, localisation (when there are masks) and faithfulness of one batch of maps, into `acc`."""
    if "sparsity" in groups:
        acc.add(model.name, "gini", method, gini_index(maps))
    if masks is not None:
        keep = masks.flatten(1).any(dim=1)  # an object cropped away leaves nothing to point at
        maps_kept, masks_kept = maps[keep], masks[keep]
        acc.add(model.name, "pointing_game", method, pointing_game(maps_kept, masks_kept))
        acc.add(model.name, "energy_pointing_game", method, energy_pointing_game(maps_kept, masks_kept))
        iou = top_fraction_iou(maps_kept, masks_kept, args.iou_fraction)
        acc.add(model.name, "top_k_iou", method, iou, fraction=args.iou_fraction)
    if "faithfulness" in groups:
        score = partial(class_similarity, model.embed, text_embeds=text)
        steps = args.faithfulness_steps
        deletion = faithfulness_curve(score, pixels, maps, "deletion", steps)
        insertion = faithfulness_curve(score, pixels, maps, "insertion", steps)
        acc.add(model.name, "deletion_auc", method, curve_auc(deletion), steps=steps, baseline="black")
        start_name = f"blur(sigma={INSERTION_BLUR_SIGMA}px)"
        acc.add(model.name, "insertion_auc", method, curve_auc(insertion), steps=steps, baseline=start_name)


class _RoarFeatures:
    """Frozen features of the clean and the pixel-removed images, gathered batch by batch, then probed."""

    def __init__(self, fractions: list[float]) -> None:
        self.fractions = fractions
        self.clean: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.removed: dict[tuple[str, str, float], list[torch.Tensor]] = defaultdict(list)

    @torch.no_grad()
    def add(self, model: LoadedModel, method: str, pixels: torch.Tensor, maps: torch.Tensor) -> None:
        # The processor's mean colour: CLIP's training-set mean, which normalises to 0 (an uninformative fill).
        fill = torch.tensor(model.processor.image_processor.image_mean)
        for fraction in self.fractions:
            self.removed[model.name, method, fraction].append(
                model.embed(remove_top_pixels(pixels, maps, fraction, fill)).cpu()
            )

    def results(self, labels: torch.Tensor, num_classes: int, methods: list[str], seed: int) -> list[dict[str, Any]]:
        train_index, test_index = split_indices(len(labels), seed=seed)
        counts = {"num_images": len(test_index), "probe_train_images": len(train_index)}
        out = []
        for model, chunks in tqdm(self.clean.items(), desc="ROAR probes"):
            # Nothing removed: one probe per model, the curve's common starting point for every method.
            clean = roar_accuracy(torch.cat(chunks), labels, num_classes, train_index, test_index)
            for method in methods:
                out.append(_result(model, "roar_accuracy", method, clean, {"fraction": 0.0, **counts}))
                for fraction in self.fractions:
                    features = torch.cat(self.removed[model, method, fraction])
                    value = roar_accuracy(features, labels, num_classes, train_index, test_index)
                    out.append(_result(model, "roar_accuracy", method, value, {"fraction": fraction, **counts}))
        return out


def run_evaluation(
    args: EvaluationArguments, models: list[LoadedModel] | None = None
) -> tuple[dict[str, Any], FigureData]:
    """Evaluate every model on the dataset and write nothing: return the results (schema ``hf_clip_aft.eval/v1``)
    and the images and maps of the saliency figure. `models` reuses already loaded models (order of ``args.models``).
    """
    args.check()
    groups, methods = args.metric_groups(), args.saliency_methods()
    device = _device(args)
    data = load_evaluation_data(
        args.dataset,
        args.dataset_config,
        args.split,
        args.limit,
        args.seed,
        args.image_column,
        args.label_column,
        args.mask_column,
    )
    models = models if models is not None else [load_clip(name, device) for name in args.models]
    templates = PROMPT_SETS[args.prompts]
    class_embeds = {
        m.name: class_text_embeddings(m.model, m.processor.tokenizer, data.class_names, templates) for m in models
    }
    notes: list[str] = []
    if "localization" in groups and data.mask_column is None:
        notes.append("localization skipped: the dataset has no object-mask column (pass --mask_column to name one).")
        logger.warning(notes[-1])

    method_settings = {
        "channel_reduction": args.channel_reduction,
        "smoothgrad_samples": args.smoothgrad_samples,
        "smoothgrad_noise": args.smoothgrad_noise,
        "ig_steps": args.ig_steps,
        "gradcam_layer": args.gradcam_layer,
        "rollout_residual": args.rollout_residual,
    }
    acc = _Accumulator()
    roar = _RoarFeatures(args.roar_fractions) if "roar" in groups else None
    all_labels: list[torch.Tensor] = []
    figure = FigureData()
    num_batches = -(-len(data.dataset) // args.batch_size)
    for index, batch in enumerate(tqdm(iterate_batches(data, args.batch_size), total=num_batches, desc="evaluate")):
        need = max(args.grid_images - len(figure), 0) if methods else 0
        all_labels.append(batch.labels)
        for position, m in enumerate(models):
            torch.manual_seed(args.seed + index)  # the same noise and attack starts for every model
            image_processor = m.processor.image_processor
            pixels = images_to_pixels(batch.images, image_processor).to(device)
            labels = batch.labels.to(device)
            with torch.no_grad():
                embeds = m.embed(pixels)
            predictions = zero_shot_predictions(embeds, class_embeds[m.name])
            if "zero_shot" in groups:
                acc.add(m.name, "accuracy", None, predictions == labels, templates=len(templates))
            if "robustness" in groups:
                for eps in args.robust_eps:
                    adv = robust_predictions(
                        m.embed, m.model, pixels, class_embeds[m.name], eps, args.attack_steps, args.attack_step_size
                    )
                    attack = {
                        "eps": eps,
                        "steps": args.attack_steps,
                        "step_size": args.attack_step_size,
                        "norm": "linf",
                    }
                    acc.add(m.name, "robust_accuracy", None, adv == labels, **attack)
            if not methods:
                continue
            masks = None
            if "localization" in groups and batch.masks is not None:
                masks = masks_to_tensor(batch.masks, image_processor).to(device)
            text = class_embeds[m.name][labels if args.target == "label" else predictions]
            if position == 0 and need:
                figure.pixels.append(pixels[:need].cpu())
                figure.titles += [data.class_names[int(t)] for t in batch.labels[:need]]
            if roar is not None:
                roar.clean[m.name].append(embeds.cpu())
            for method in methods:
                maps = saliency(m.model, pixels, text, method, image_processor=image_processor, **method_settings)
                if need:
                    figure.maps[method, m.name].append(maps[:need].cpu())
                _map_metrics(acc, m, method, maps, pixels, masks, text, groups, args)
                if roar is not None:
                    roar.add(m, method, pixels, maps)

    results = acc.results()
    if roar is not None:
        results += roar.results(torch.cat(all_labels), len(data.class_names), methods, args.seed)
    settings = {
        key: value
        for key, value in dataclasses.asdict(args).items()
        if key not in ("models", "dataset", "dataset_config", "split", "output", "zero_shot_preset")
    }
    settings.update(
        metrics=groups,
        methods=methods,
        device=str(device),
        image_column=data.image_column,
        mask_column=data.mask_column,
        num_classes=len(data.class_names),
        prompt_templates=list(templates),
        notes=notes,
    )
    dataset = {
        "name": args.dataset,
        "config": args.dataset_config,
        "split": args.split,
        "num_images": len(data.dataset),
    }
    names = [m.name for m in models]
    return {"schema": SCHEMA, "dataset": dataset, "models": names, "settings": settings, "results": results}, figure


def write_outputs(results: dict[str, Any], figure: FigureData, output: str, methods: list[str]) -> None:
    """Write ``results.json``, ``summary.md`` and (when maps were computed) ``saliency_grid.png`` into `output`."""
    os.makedirs(output, exist_ok=True)
    save_results(results, os.path.join(output, "results.json"))
    with open(os.path.join(output, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary_markdown(results))
    if methods and len(figure):
        saliency_grid(
            torch.cat(figure.pixels),
            {key: torch.cat(chunks) for key, chunks in figure.maps.items()},
            results["models"],
            methods,
            os.path.join(output, "saliency_grid.png"),
            titles=figure.titles,
        )
    logger.info("Wrote the evaluation to %s", output)


def evaluate_models(args: EvaluationArguments) -> dict[str, Any]:
    """Run the evaluation and write its outputs into ``args.output``; return the results.

    With ``args.zero_shot_preset``, run zero-shot accuracy on every dataset of the preset instead, each into its
    own sub-folder ``args.output/<dataset name>/``, loading the models once; returns ``{dataset name: results}``.
    """
    args.check()
    if args.zero_shot_preset is None:
        results, figure = run_evaluation(args)
        write_outputs(results, figure, args.output, args.saliency_methods())
        return results
    device = _device(args)
    models = [load_clip(name, device) for name in args.models]
    everything = {}
    for spec in zero_shot_preset(args.zero_shot_preset):
        run_args = dataclasses.replace(
            args,
            dataset=spec.path,
            dataset_config=spec.config,
            split=spec.split,
            label_column=spec.label_column,
            metrics=["zero_shot"],
            output=os.path.join(args.output, spec.name),
            zero_shot_preset=None,
        )
        results, figure = run_evaluation(run_args, models)
        write_outputs(results, figure, run_args.output, [])
        everything[spec.name] = results
    return everything
