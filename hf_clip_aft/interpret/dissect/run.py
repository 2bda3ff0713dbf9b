"""The dissection run: load the models and the probe set, stream the probe images through every model (twice with
concept labels: thresholds, then the IoU tally), describe each layer's units, write the results."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from ...data import images_to_pixels, open_image
from ...files import write_json_atomic, write_text_atomic
from ..suite import LoadedModel, load_clip
from ..zero_shot import class_text_embeddings
from .activations import encoder_layers, patch_grid, resolve_layers, summarize_tokens, unit_tokens
from .arguments import DissectionArguments
from .broden import is_broden, load_broden
from .concepts import default_vocabulary, load_concepts
from .constants import (
    CONCEPT_TEMPLATE,
    METHOD_CLIP_DISSECT,
    METHOD_NETDISSECT,
    MIN_PROB,
    SOFT_WPMI_LAMBDA,
    SOFT_WPMI_P_END,
    SOFT_WPMI_P_START,
    SOFT_WPMI_TEMPERATURE,
    SOFT_WPMI_TOP_K,
    WPMI_LAMBDA,
    WPMI_TEMPERATURE,
    WPMI_TOP_K,
)
from .figure import top_images_figure
from .netdissect import ConceptTally, QuantileSketch, unit_masks
from .probe import ProbeData, describe_row, label_channels, load_dataset_probe
from .results import SCHEMA, validate_dissection
from .similarity import best_concepts, constant_units, image_concept_similarity, layer_scores, null_test
from .summary import dissection_summary

logger = logging.getLogger(__name__)


def load_probe_data(args: DissectionArguments) -> ProbeData:
    """The probe set of ``args``: a Broden folder (:func:`~.broden.load_broden`, every category) or a `datasets`
    dataset with ``args.mask_columns`` as categories; a seeded subset of ``args.limit`` images."""
    if is_broden(args.probe_dataset):
        return load_broden(args.probe_dataset, args.split, args.limit, args.seed)
    return load_dataset_probe(
        args.probe_dataset,
        args.probe_config,
        args.split,
        args.image_column,
        args.mask_columns,
        args.mask_labels,
        args.limit,
        args.seed,
    )


def _number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def clip_dissect_layer(
    activations: torch.Tensor,
    image_concept: torch.Tensor,
    concepts: Sequence[str],
    rows: Sequence[int],
    args: DissectionArguments,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """CLIP-Dissect of one layer's activations ``(N, U)`` against P ``(N, C)`` (on P's device): its summary
    numbers and one record per unit."""
    activations = activations.float().cpu()
    scores = layer_scores(args.similarity, activations, image_concept, args.top_k)
    constant = constant_units(activations)
    values, indices = best_concepts(scores.similarity.cpu(), constant)
    generator = torch.Generator().manual_seed(args.seed)  # the same null draws for every model and layer
    test = null_test(scores, activations, args.null_units, args.null_quantile, generator)
    conditionals = None
    if scores.conditional is not None:
        at_best = indices.clamp_min(0).view(-1, 1).to(scores.conditional.device)
        conditionals = scores.conditional.gather(1, at_best).flatten().cpu()
    labelled = test.labelled(values, conditionals)
    top_images = torch.topk(activations, k=min(args.figure_images, activations.shape[0]), dim=0).indices.T
    units = [
        {
            "unit": unit,
            "concept": None if constant[unit] else concepts[indices[unit]],
            "similarity": _number(values[unit].item()),
            "labelled": bool(labelled[unit]),
            "top_images": [rows[i] for i in top_images[unit].tolist()],
        }
        for unit in range(activations.shape[1])
    ]
    varying = values[~constant]
    summary = {
        "num_units": activations.shape[1],
        "constant_units": int(constant.sum()),
        "labelled_fraction": labelled.double().mean().item(),
        "unique_concepts": len({u["concept"] for u in units if u["labelled"]}),
        "mean_best_similarity": varying.double().mean().item() if len(varying) else 0.0,
        "threshold": test.threshold if math.isfinite(test.threshold) else 0.0,
    }
    return summary, units


def describe_detectors(
    tallies: dict[str, ConceptTally],
    names: dict[str, list[str] | None],
    concept_ids: dict[str, list[int] | None],
    iou_threshold: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Network Dissection's summary and unit records from one layer's tallies ``{category: ConceptTally}``: each
    unit's best concept over the categories' concepts (`concept_ids`, None: every id but 0), named by `names`
    (None: ``category=id``). A unit whose IoU is 0 for every concept gets none."""
    ious, concept_names, categories = [], [], []
    for category, tally in tallies.items():
        iou = tally.iou()
        category_names = names.get(category)
        if category_names is not None:
            if iou.shape[1] > len(category_names):
                raise ValueError(
                    f"{category} holds label id {iou.shape[1] - 1} but its label names stop at id "
                    f"{len(category_names) - 1}; name every label id."
                )
            iou = torch.nn.functional.pad(iou, (0, len(category_names) - iou.shape[1]))
        allowed = torch.zeros(iou.shape[1], dtype=torch.bool)
        ids = concept_ids.get(category)
        allowed[1:] = ids is None
        if ids is not None:
            allowed[[i for i in ids if i < iou.shape[1]]] = True
        ious.append(iou.cpu().masked_fill(~allowed, 0.0))
        concept_names += category_names or [f"{category}={i}" for i in range(iou.shape[1])]
        categories += [category] * iou.shape[1]
    best, index = torch.cat(ious, dim=1).max(dim=1)
    detector = best > iou_threshold
    units = [
        {
            "unit": unit,
            "concept": concept_names[index[unit]] if best[unit] > 0 else None,
            "category": categories[index[unit]] if best[unit] > 0 else None,
            "iou": best[unit].item(),
            "detector": bool(detector[unit]),
        }
        for unit in range(len(best))
    ]
    per_category = Counter(u["category"] for u in units if u["detector"])
    summary = {
        "num_units": len(best),
        "detectors": int(detector.sum()),
        "detector_fraction": detector.double().mean().item(),
        "unique_detector_concepts": len({u["concept"] for u in units if u["detector"]}),
        "mean_best_iou": best.double().mean().item(),
        "detectors_per_category": {category: per_category.get(category, 0) for category in tallies},
    }
    return summary, units


def network_dissection_layer(
    maps: torch.Tensor,
    labels: dict[str, torch.Tensor],
    names: dict[str, list[str] | None],
    args: DissectionArguments,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Network Dissection of one layer's maps ``(N, U, h, w)`` held in memory against label maps ``{category:
    (N, S, S)}`` that annotate every image: the run's thresholds (:class:`QuantileSketch`) and tally."""
    sketch = QuantileSketch(maps.shape[1], args.quantile_bins, maps.device)
    for start in range(0, len(maps), args.batch_size):
        sketch.update(maps[start : start + args.batch_size])
    thresholds = sketch.quantile(1 - args.quantile)
    tallies = {c: ConceptTally(maps.shape[1], len(names.get(c) or [0]), maps.device) for c in labels}
    for i in range(len(maps)):
        masks = unit_masks(maps[i], thresholds, next(iter(labels.values())).shape[-1])
        for category, label_map in labels.items():
            tallies[category].update(masks, label_map[i].flatten()[None])
    return describe_detectors(tallies, names, dict.fromkeys(labels), args.iou_threshold)


def _open_images(probe: ProbeData, positions: Sequence[int]) -> tuple[list[Image.Image], list[int]]:
    """The images at `positions` that can be read, and their positions; an unreadable one is logged and left out."""
    images, kept = [], []
    for position in positions:
        try:
            images.append(open_image(probe.image(position)))
            kept.append(position)
        except Exception as error:  # noqa: BLE001 - one unreadable probe image must not stop the run
            logger.warning("Skipping an unreadable probe image (%s): %s", describe_row(probe, position), error)
    return images, kept


@dataclasses.dataclass
class _FirstPass:
    """What the first pass over the probe set gathers: the readable images' positions, per model and layer the
    image summaries ``(N, U)`` and (with labels) each unit's threshold sketch, and the dissector's embeddings."""

    kept: list[int] = dataclasses.field(default_factory=list)
    activations: dict[tuple[str, int], list[torch.Tensor]] = dataclasses.field(
        default_factory=lambda: defaultdict(list)
    )
    sketches: dict[tuple[str, int], QuantileSketch] = dataclasses.field(default_factory=dict)
    image_embeds: list[torch.Tensor] = dataclasses.field(default_factory=list)


def _first_pass(
    args: DissectionArguments,
    probe: ProbeData,
    models: list[LoadedModel],
    dissector: LoadedModel,
    layers: dict[str, list[int]],
    device: torch.device,
) -> _FirstPass:
    out = _FirstPass()
    for start in tqdm(range(0, len(probe), args.batch_size), desc="dissect: activations"):
        images, positions = _open_images(probe, range(start, min(start + args.batch_size, len(probe))))
        if not images:
            continue
        out.kept += positions
        for m in models:
            image_processor = m.processor.image_processor
            pixels = images_to_pixels(images, image_processor).to(device)
            tokens, embeds = unit_tokens(m.model, pixels, image_processor, layers[m.name], args.unit_kind)
            if m is dissector:
                out.image_embeds.append(embeds)
            for layer, value in tokens.items():
                out.activations[m.name, layer].append(summarize_tokens(value, args.summary).cpu())
                if probe.categories:
                    key = (m.name, layer)
                    if key not in out.sketches:
                        out.sketches[key] = QuantileSketch(value.shape[-1], args.quantile_bins, device)
                    out.sketches[key].update(patch_grid(value))
        if all(dissector is not m for m in models):
            out.image_embeds.append(
                dissector.embed(images_to_pixels(images, dissector.processor.image_processor).to(device))
            )
    return out


def _tally_pass(
    args: DissectionArguments,
    probe: ProbeData,
    models: list[LoadedModel],
    layers: dict[str, list[int]],
    first: _FirstPass,
    device: torch.device,
) -> dict[tuple[str, int], dict[str, ConceptTally]]:
    """The second pass: each unit's maps thresholded (bilinear upsampling to ``mask_size``) and tallied against the
    label channels of every category the image is annotated in."""
    thresholds = {key: sketch.quantile(1 - args.quantile) for key, sketch in first.sketches.items()}
    tallies = {
        key: {
            c: ConceptTally(sketch.counts.shape[0], len(probe.label_names.get(c) or [0]), device)
            for c in probe.categories
        }
        for key, sketch in first.sketches.items()
    }
    for start in tqdm(range(0, len(first.kept), args.batch_size), desc="dissect: IoU tally"):
        images, positions = _open_images(probe, first.kept[start : start + args.batch_size])
        if not images:
            continue
        for m in models:
            image_processor = m.processor.image_processor
            annotated = []
            for position in positions:
                where = describe_row(probe, position)
                channels = {
                    c: label_channels(v, image_processor, args.mask_size, where)
                    for c, v in probe.labels(position).items()
                }
                annotated.append({c: v.to(device) for c, v in channels.items() if v is not None})
            pixels = images_to_pixels(images, image_processor).to(device)
            tokens, _ = unit_tokens(m.model, pixels, image_processor, layers[m.name], args.unit_kind)
            for layer, value in tokens.items():
                grid = patch_grid(value)
                for b, channels in enumerate(annotated):
                    if not channels:
                        continue
                    masks = unit_masks(grid[b], thresholds[m.name, layer], args.mask_size)
                    for category, labels in channels.items():
                        tallies[m.name, layer][category].update(masks, labels)
    return tallies


def _settings(
    args: DissectionArguments, dissector: str, num_images: int, concepts: list[str], device
) -> dict[str, Any]:
    top_k = args.top_k or {"soft_wpmi": SOFT_WPMI_TOP_K, "wpmi": WPMI_TOP_K}.get(args.similarity)
    return {
        **{k: v for k, v in dataclasses.asdict(args).items() if k not in ("models", "probe_dataset", "probe_config")},
        "dissector": dissector,
        "top_k": None if top_k is None else min(top_k, num_images),
        "concept_source": args.concepts or f"wordfreq top {args.vocabulary_size} English words",
        "num_concepts": len(concepts),
        "concept_template": CONCEPT_TEMPLATE,
        "device": str(device),
        "constants": {
            "soft_wpmi": {
                "temperature": SOFT_WPMI_TEMPERATURE,
                "lambda": SOFT_WPMI_LAMBDA,
                "p_start": SOFT_WPMI_P_START,
                "p_end": SOFT_WPMI_P_END,
                "min_prob": MIN_PROB,
            },
            "wpmi": {"temperature": WPMI_TEMPERATURE, "lambda": WPMI_LAMBDA, "min_prob": MIN_PROB},
        },
    }


def _run(args: DissectionArguments) -> tuple[dict[str, Any], ProbeData]:
    args.check()
    device = torch.device(args.device) if args.device else PartialState().device
    concepts = load_concepts(args.concepts) if args.concepts else default_vocabulary(args.vocabulary_size)
    probe = load_probe_data(args)
    models = [load_clip(name, device) for name in args.models]
    dissector_name = args.dissector or args.models[0]
    loaded = {m.name: m for m in models}
    dissector = loaded.get(dissector_name) or load_clip(dissector_name, device)
    layers = {m.name: resolve_layers(args.layers, len(encoder_layers(m.model))) for m in models}
    first = _first_pass(args, probe, models, dissector, layers, device)
    skipped = len(probe) - len(first.kept)
    if not first.kept:
        raise ValueError(f"None of the {len(probe)} probe images of {args.probe_dataset} could be read; see the log.")
    if skipped:
        logger.warning("Skipped %d of %d probe images that could not be read.", skipped, len(probe))
    rows = [probe.rows[i] for i in first.kept]
    text = class_text_embeddings(dissector.model, dissector.processor.tokenizer, concepts, (CONCEPT_TEMPLATE,))
    image_concept = image_concept_similarity(torch.cat(first.image_embeds), text.to(device))
    tallies = _tally_pass(args, probe, models, layers, first, device) if probe.categories else {}
    entries = []
    for m in tqdm(models, desc="dissect: similarities"):
        for layer in layers[m.name]:
            activations = torch.cat(first.activations[m.name, layer])
            summary, units = clip_dissect_layer(activations, image_concept, concepts, rows, args)
            entries.append(
                {"model": m.name, "layer": layer, "method": METHOD_CLIP_DISSECT, "summary": summary, "units": units}
            )
            if probe.categories:
                summary, units = describe_detectors(
                    tallies[m.name, layer], probe.label_names, probe.concept_ids, args.iou_threshold
                )
                entries.append(
                    {"model": m.name, "layer": layer, "method": METHOD_NETDISSECT, "summary": summary, "units": units}
                )
    dataset = {
        "name": args.probe_dataset,
        "config": args.probe_config,
        "split": args.split,
        "num_images": len(first.kept),
        "skipped_images": skipped,
    }
    results = {
        "schema": SCHEMA,
        "dataset": dataset,
        "models": list(args.models),
        "settings": _settings(args, dissector_name, len(first.kept), concepts, device),
        "layers": entries,
    }
    return results, probe


def run_dissection(args: DissectionArguments) -> dict[str, Any]:
    """Dissect every model's layers on the probe set and write nothing; return the results (schema
    ``hf_clip_aft.dissect/v1``, see :func:`~.results.validate_dissection`)."""
    return _run(args)[0]


def dissect_models(args: DissectionArguments) -> dict[str, Any]:
    """Run the dissection and write ``results.json`` (validated), ``summary.md`` and ``top_images.png`` into
    ``args.output``, each atomically; return the results."""
    results, probe = _run(args)
    validate_dissection(results)
    os.makedirs(args.output, exist_ok=True)
    write_json_atomic(os.path.join(args.output, "results.json"), results)
    write_text_atomic(os.path.join(args.output, "summary.md"), dissection_summary(results))
    top_images_figure(
        results, probe, os.path.join(args.output, "top_images.png"), args.figure_units, args.figure_images
    )
    logger.info("Wrote the dissection to %s", args.output)
    return results
