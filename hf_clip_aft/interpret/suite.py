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
from typing import Any, Literal

import torch
from accelerate import PartialState
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPProcessor

from ..data import images_to_pixels, load_processor
from ..modeling import EmbedFn, embed_fn

# Imported for their registrations (the metrics and their groups' scorers; the training-free map methods), so that
# the arguments' help and choices list them whichever module was imported first.
from . import scorers as _scorers  # noqa: F401
from . import surgery as _surgery  # noqa: F401
from .batches import (
    Batch,
    EvaluationData,
    iterate_batches,
    load_evaluation_data,
    localisation_masks,
    read_class_names,
)
from .figures import saliency_grid
from .registry import MAP_METHODS, SCORERS, BatchContext, RunContext, Score, Scorer, metric_groups, result_entry
from .results import results_document, save_results, save_summary
from .roar import ROAR_FRACTIONS
from .saliency import saliency
from .surgery import empty_prompt_embedding
from .zero_shot import (
    PROMPT_TEMPLATES,
    SINGLE_TEMPLATE,
    class_text_embeddings,
    zero_shot_predictions,
    zero_shot_preset,
)

logger = logging.getLogger(__name__)

PROMPT_SETS = {"ensemble": PROMPT_TEMPLATES, "single": SINGLE_TEMPLATE}
TARGETS = ("label", "prediction")


def _metrics_help() -> str:
    groups = metric_groups()
    listed = "; ".join(f"{group} ({', '.join(groups.get(group, ()))})" for group in SCORERS)
    defaults = [group for group, scorer in SCORERS.items() if scorer.default]
    opt_in = [group for group, scorer in SCORERS.items() if not scorer.default]
    return (
        f"Metric groups (the results they give): {listed}. 'all' = {', '.join(defaults)}; "
        f"{', '.join(opt_in)} are heavier or need class masks, and opt-in ('all {opt_in[0]}' adds {opt_in[0]})."
    )


def method_selectors() -> dict[str, list[str]]:
    """The ``--methods`` words that stand for several map methods, in registration order: ``all`` (every method
    whose ``default`` is set: the gradient and attention maps) and each family name that is not also a method's
    name (``gradient``, ``training-free``; not ``attention``, which names the CLS-attention method)."""
    selectors = {"all": [name for name, method in MAP_METHODS.items() if method.default]}
    for method in MAP_METHODS.values():
        if method.family not in MAP_METHODS:
            selectors.setdefault(method.family, []).append(method.name)
    return selectors


def _methods_help() -> str:
    words = "; ".join(f"'{word}' = {', '.join(names)}" for word, names in method_selectors().items())
    return (
        f"Map methods: {', '.join(MAP_METHODS)}, or these selectors (combinable): {words}. E.g. 'all training-free' "
        "= every method; 'simple_gradient clip_surgery' gives the {gradient, training-free} x models table."
    )


@dataclass
class EvaluationArguments:
    """Settings of an evaluation run (the fields of ``recipes/evaluate.py``)."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "CLIPModel folders or Hub ids, base model first, AFT model last."},
    )
    dataset: str = field(default="", metadata={"help": "Hub dataset id or local imagefolder with a label column."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    split: str = field(default="test", metadata={"help": "Dataset split."})
    output: str = field(default="eval", metadata={"help": "Output folder for results.json, summary.md, the grid."})
    metrics: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={"help": _metrics_help()},
    )
    methods: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={"help": _methods_help()},
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate a seeded random subset of this many images."})
    batch_size: int = field(default=16, metadata={"help": "Images per batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the subset, SmoothGrad noise, PGD starts, ROAR split."})
    device: str | None = field(default=None, metadata={"help": "Torch device; default: accelerate's (GPU if any)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; default: the first Image one."})
    label_column: str = field(
        default="label",
        metadata={"help": "Label column: a ClassLabel, class names as text, or (with --class_names) class indices."},
    )
    class_names: str | None = field(
        default=None,
        metadata={
            "help": "UTF-8 text file of the class names, one per line, line i + 1 naming class index i, e.g. "
            "--class_names recipes/configs/voc2012-classes.txt (Pascal VOC's 21, background first). The label column "
            "then holds integer indices into this list (each must lie in [0, number of names)) or names from it "
            "(each mapped to its index), and class masks for segmentation hold the same indices; a ClassLabel "
            "column must have exactly these names in this order. Underscores read as spaces in the prompts. "
            "Default: the ClassLabel's names, or text labels encoded in sorted order (classes present only)."
        },
    )
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
    segmentation_background_threshold: float | None = field(
        default=None,
        metadata={
            "help": "segmentation: pixels whose highest class probability, softmax(40 x raw score) over the classes "
            "(NACLIP's and SCLIP's rule; they use 0.1), is below this are predicted as class 0, the background; "
            "default: plain arg-max of the raw scores over every class, the background (if a class) through its "
            "prompt."
        },
    )
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
            requested |= {group for group, scorer in SCORERS.items() if scorer.default}
        unknown = requested - set(SCORERS)
        if unknown:
            raise ValueError(f"Unknown metric groups {sorted(unknown)}; choose from {list(SCORERS)} or 'all'.")
        return [group for group in SCORERS if group in requested]

    def saliency_methods(self) -> list[str]:
        """The map methods requested, selectors expanded (:func:`method_selectors`), in the order given, each once;
        none when no requested metric group uses maps."""
        if not any(SCORERS[group].uses_maps for group in self.metric_groups()):
            return []
        selectors = method_selectors()
        methods = list(dict.fromkeys(name for word in self.methods for name in selectors.get(word, [word])))
        unknown = set(methods) - set(MAP_METHODS)
        if unknown:
            raise ValueError(
                f"Unknown saliency methods {sorted(unknown)}; choose from {tuple(MAP_METHODS)} or the selectors "
                f"{tuple(selectors)}."
            )
        return methods

    def method_options(self) -> dict[str, Any]:
        """The options every map method receives (each takes those it knows)."""
        return {
            "channel_reduction": self.channel_reduction,
            "smoothgrad_samples": self.smoothgrad_samples,
            "smoothgrad_noise": self.smoothgrad_noise,
            "ig_steps": self.ig_steps,
            "gradcam_layer": self.gradcam_layer,
            "rollout_residual": self.rollout_residual,
        }

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
        if self.class_names is not None:
            if self.zero_shot_preset is not None:
                raise ValueError(
                    f"class_names={self.class_names!r} names the classes of --dataset, but zero_shot_preset="
                    f"{self.zero_shot_preset!r} evaluates the preset's datasets with their own classes; drop one."
                )
            read_class_names(self.class_names)
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
    processor = load_processor(name_or_path)
    return LoadedModel(name_or_path, model, processor, embed_fn(model, processor.image_processor))


@dataclass
class FigureData:
    """What the saliency grid shows: the first images (as the first model sees them), their row titles (the class
    explained), their object masks (when the dataset has them), the maps, and, when each model explains its own
    prediction, the class each model's maps explain."""

    pixels: list[torch.Tensor] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    masks: list[torch.Tensor] = field(default_factory=list)
    maps: dict[tuple[str, str], list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    explained: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def __len__(self) -> int:
        return sum(len(p) for p in self.pixels)


class _Averages:
    """Per-image scores, keyed by (model, metric, method, settings), averaged into one result per key."""

    def __init__(self) -> None:
        self.values: dict[tuple, list[torch.Tensor]] = defaultdict(list)

    def add(self, batch: BatchContext, scores: list[Score]) -> None:
        for score in scores:
            key = batch.model_name, score.metric, batch.method, tuple(score.settings.items())
            self.values[key].append(score.values.detach().float().cpu())

    def results(self) -> list[dict[str, Any]]:
        out = []
        for (model, metric, method, settings), chunks in self.values.items():
            values = torch.cat(chunks)
            if values.numel() == 0:
                continue
            settings = {**dict(settings), "num_images": values.numel()}
            out.append(result_entry(model, metric, method, values.double().mean().item(), settings))
        return out


def _device(args: EvaluationArguments) -> torch.device:
    return torch.device(args.device) if args.device else PartialState().device


def _load_data(args: EvaluationArguments) -> EvaluationData:
    return load_evaluation_data(
        args.dataset,
        args.dataset_config,
        args.split,
        args.limit,
        args.seed,
        args.image_column,
        args.label_column,
        args.mask_column,
        None if args.class_names is None else read_class_names(args.class_names),
    )


def _batch_context(
    index: int,
    batch: Batch,
    model: LoadedModel,
    class_embeds: tuple[torch.Tensor, torch.Tensor],
    args: EvaluationArguments,
    device,
) -> BatchContext:
    """Load step: `batch` as `model` sees it (pixels, embeddings, zero-shot predictions, target text embeddings).
    `class_embeds` holds the model's class text embeddings and its empty-prompt embedding (CLIP Surgery's)."""
    class_embeds, empty_prompt = class_embeds
    image_processor = model.processor.image_processor
    pixels = images_to_pixels(batch.images, image_processor).to(device)
    labels = batch.labels.to(device)
    with torch.no_grad():
        embeds = model.embed(pixels)
    predictions = zero_shot_predictions(embeds, class_embeds)
    return BatchContext(
        index=index,
        model_name=model.name,
        model=model.model,
        image_processor=image_processor,
        embed=model.embed,
        pixels=pixels,
        labels=labels,
        mask_images=batch.masks,
        image_embeds=embeds,
        class_embeds=class_embeds,
        predictions=predictions,
        text_embeds=class_embeds[labels if args.target == "label" else predictions],
        method_options={**args.method_options(), "empty_prompt_embeds": empty_prompt},
    )


class _Evaluation:
    """One run's batch step: score a batch for every model, computing each method's maps between the two kinds of
    scorers (those without maps first, so that their random draws come before the maps'), and keep the figure's."""

    def __init__(self, args: EvaluationArguments, run: RunContext, scorers: list[Scorer]) -> None:
        self.args, self.run = args, run
        self.image_scorers = [scorer for scorer in scorers if not scorer.uses_maps]
        self.map_scorers = [scorer for scorer in scorers if scorer.uses_maps]
        self.averages = _Averages()
        self.figure = FigureData()

    def batch(self, index: int, batch: Batch, models: list[LoadedModel], class_embeds, device, progress: tqdm) -> None:
        """Score `batch` with every model; `progress` (in images) advances after each model's scores and each of its
        methods' maps, by that step's share of the batch's images."""
        need = max(self.args.grid_images - len(self.figure), 0) if self.run.methods else 0
        start, steps, done = progress.n, len(models) * (1 + len(self.run.methods)), 0

        def step() -> None:  # exact at the batch's end, whatever the rounding of the shares before
            nonlocal done
            done += 1
            progress.update(start + len(batch.labels) * done / steps - progress.n)

        for position, model in enumerate(models):
            torch.manual_seed(self.args.seed + index)  # the same noise and attack starts for every model
            progress.set_postfix_str(os.path.basename(os.path.normpath(model.name)), refresh=False)
            context = _batch_context(index, batch, model, class_embeds[model.name], self.args, device)
            self.score(context, self.image_scorers)
            step()
            if position == 0 and need:
                self.figure.pixels.append(context.pixels[:need].cpu())
                self.figure.titles += [self.row_title(int(t)) for t in batch.labels[:need]]
                if batch.masks is not None:
                    objects, _ = localisation_masks(batch.masks[:need], context.image_processor)
                    self.figure.masks.append(objects)
            if need and self.args.target == "prediction":
                self.figure.explained[model.name] += [self.run.class_names[int(p)] for p in context.predictions[:need]]
            for method in self.run.methods:
                progress.set_postfix_str(f"{os.path.basename(os.path.normpath(model.name))}, {method}", refresh=False)
                context.method, context.maps = method, self.maps(context, method)
                if need:
                    self.figure.maps[method, model.name].append(context.maps[:need].cpu())
                self.score(context, self.map_scorers)
                step()

    def row_title(self, label: int) -> str:
        """The grid row's title: the class whose prompt the maps explain (the label, or each model's prediction)."""
        name = self.run.class_names[label]
        return f"explains: {name}" if self.args.target == "label" else f"label: {name}; maps explain the prediction"

    @staticmethod
    def maps(context: BatchContext, method: str) -> torch.Tensor:
        """Compute-maps step: `method`'s maps of the batch for its target text embeddings."""
        return saliency(
            context.model,
            context.pixels,
            context.text_embeds,
            method,
            image_processor=context.image_processor,
            **context.method_options,
        )

    def score(self, context: BatchContext, scorers: list[Scorer]) -> None:
        """Score step: every scorer sees the batch; per-image scores go to the dataset averages."""
        for scorer in scorers:
            self.averages.add(context, scorer.update(context))


def run_evaluation(
    args: EvaluationArguments, models: list[LoadedModel] | None = None
) -> tuple[dict[str, Any], FigureData]:
    """Evaluate every model on the dataset and write nothing: return the results (schema ``hf_clip_aft.eval/v1``)
    and the images and maps of the saliency figure. `models` reuses already loaded models (order of ``args.models``).
    """
    args.check()
    groups, methods = args.metric_groups(), args.saliency_methods()
    device = _device(args)
    data = _load_data(args)
    models = models if models is not None else [load_clip(name, device) for name in args.models]
    templates = PROMPT_SETS[args.prompts]
    class_embeds = {  # the classes' prompts, and the empty prompt (CLIP Surgery's redundant feature for one target)
        m.name: (
            class_text_embeddings(m.model, m.processor.tokenizer, data.class_names, templates),
            empty_prompt_embedding(m.model, m.processor.tokenizer, templates),
        )
        for m in models
    }
    run = RunContext(args, methods, data.class_names, data.mask_column, tuple(templates), args.seed)
    scorers = [SCORERS[group](run) for group in groups]
    evaluation = _Evaluation(args, run, scorers)
    # Counted in images, advanced step by step within a batch (a CPU batch of gradient maps can take minutes).
    progress = tqdm(
        total=len(data.dataset),
        desc="evaluate",
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total} images [{elapsed}<{remaining}{postfix}]",
    )
    with progress:
        for index, batch in enumerate(iterate_batches(data, args.batch_size)):
            evaluation.batch(index, batch, models, class_embeds, device, progress)
    results = evaluation.averages.results() + [entry for scorer in scorers for entry in scorer.results()]
    return _document(args, data, models, run, scorers, device, results), evaluation.figure


def _document(args, data, models, run, scorers, device, results) -> dict[str, Any]:
    """The results file's content: the dataset, the models, the run's settings and the results."""
    settings = {
        key: value
        for key, value in dataclasses.asdict(args).items()
        if key not in ("models", "dataset", "dataset_config", "split", "output", "zero_shot_preset")
    }
    settings.update(
        metrics=[scorer.group for scorer in scorers],
        methods=run.methods,
        device=str(device),
        image_column=data.image_column,
        mask_column=data.mask_column,
        num_classes=len(data.class_names),
        prompt_templates=list(run.templates),
        notes=[note for scorer in scorers for note in scorer.notes],
    )
    dataset = {
        "name": args.dataset,
        "config": args.dataset_config,
        "split": args.split,
        "num_images": len(data.dataset),
    }
    return results_document(dataset, [m.name for m in models], settings, results)


def write_outputs(results: dict[str, Any], figure: FigureData, output: str, methods: list[str]) -> None:
    """Write ``results.json``, ``summary.md`` and (when maps were computed) ``saliency_grid.png`` into `output`."""
    os.makedirs(output, exist_ok=True)
    save_results(results, os.path.join(output, "results.json"))
    save_summary(results, os.path.join(output, "summary.md"))
    if methods and len(figure):
        saliency_grid(
            torch.cat(figure.pixels),
            {key: torch.cat(chunks) for key, chunks in figure.maps.items()},
            results["models"],
            methods,
            os.path.join(output, "saliency_grid.png"),
            titles=figure.titles,
            masks=torch.cat(figure.masks) if figure.masks else None,
            tile_captions=dict(figure.explained) or None,
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
