"""Does AFT change concept alignment? CLIP-Dissect and Network Dissection of the laptop-scale towers.

    python experiments/dissection/run.py --output experiments/dissection/results --towers /tmp/dissection_towers

For each seed: the laptop-scale experiment's base tower and its fine-tunes (``towers.py``: its final configuration,
its own code), then both dissection methods of :mod:`hf_clip_aft.interpret.dissect` on every model, block and unit
kind, on the seed's first ``--probe_size`` test scenes (the scenes the laptop experiment evaluates on):

- **CLIP-Dissect** (soft-WPMI, the permutation null of the library) with two image–concept matrices P, since the
  towers have no text tower: ``ground_truth``, one-hot presence of each concept in each image (what a dissector CLIP
  estimates), over 11 concepts (the 6 class names, the 3 shapes, the 2 textures); and ``class_vectors``, the cosine
  of the seed's *base* tower's image embedding with its 6 fixed class vectors (the stand-in text embeddings the
  towers were trained against: CLIP-Dissect's default dissector, the base model, with its own "text side").
- **Network Dissection** against per-pixel concept maps from the scenes' exact object masks, in three categories:
  ``shape`` (disc / square / triangle on the object's pixels), ``texture`` (solid / striped on the object's pixels),
  ``region`` (object / background).

Writes ``results.json`` (settings, per seed, model, unit kind, block and method: the library's summary numbers and
the count of labelled units per concept; mean ± std over seeds and per-seed differences) and ``table.md``. Towers are
built unless ``--towers`` already holds them (built from the same configuration); ``--smoke`` runs everything at toy
sizes in seconds (``tests/test_dissection_experiment.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "laptop_scale")]  # this experiment's and the laptop one's

from experiment import SPLIT_OFFSETS  # noqa: E402
from pretrain import class_embeddings, image_processor_for  # noqa: E402
from scenes import CLASS_NAMES, FILLS, SHAPES, make_scenes  # noqa: E402
from towers import FINAL_CONFIG, SMOKE_CONFIG, seed_towers  # noqa: E402

from hf_clip_aft.data import images_to_pixels  # noqa: E402
from hf_clip_aft.files import write_json_atomic, write_text_atomic  # noqa: E402
from hf_clip_aft.interpret.dissect import (  # noqa: E402
    DissectionArguments,
    clip_dissect_layer,
    image_concept_similarity,
    network_dissection_layer,
    patch_grid,
    summarize_tokens,
    unit_tokens,
)

VARIANTS = ("clean", "random", "aft")
# Label maps, one per category. Id 0 is not a concept: in `shape` and `texture` it marks the background, which is
# the concept `background` of `region` only (so that no two concepts share a mask).
MASK_LABELS = {
    "shape": ["(background)", *SHAPES],
    "texture": ["(background)", *FILLS],
    "region": ["(none)", "background", "object"],
}
GROUND_TRUTH_CONCEPTS = (*CLASS_NAMES, *SHAPES, *FILLS)
DISSECTORS = ("ground_truth", "class_vectors")
CLIP_DISSECT_KEYS = ("labelled_fraction", "unique_concepts", "mean_best_similarity")
NETDISSECT_KEYS = ("detectors", "unique_detector_concepts", "mean_best_iou")


@dataclasses.dataclass(frozen=True)
class DissectionSettings:
    """What is dissected: probe scenes, blocks, unit kinds and the library's settings (``top_k`` None: published)."""

    probe_size: int = 500
    layers: tuple[int, ...] = (0, 1, 2, 3)
    unit_kinds: tuple[str, ...] = ("mlp", "residual")
    summary: str = "cls"
    null_units: int = 1000
    batch_size: int = 100
    mask_size: int = 24  # side of the concept masks (pixels); each unit's 4 x 4 map is upsampled to it


def probe_set(
    config, seed: int, size: int, processor, mask_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed's first `size` test scenes: pixels ``(N, 3, H, W)`` in [0, 1], object masks ``(N, S, S)`` at
    ``S = mask_size`` (the share of object in each cell at least one half) and class labels ``(N,)`` (the processor
    keeps the scenes' size, so masks and pixels align)."""
    scenes = make_scenes(seed, size, config.scenes, start=SPLIT_OFFSETS["test"])
    masks = torch.from_numpy(np.stack([np.asarray(m) > 0 for m in scenes["mask"]])).float()
    masks = F.interpolate(masks[:, None], size=(mask_size, mask_size), mode="area")[:, 0] >= 0.5
    return images_to_pixels(scenes["image"], processor), masks, torch.tensor(scenes["label"])


def ground_truth_concepts(labels: torch.Tensor) -> torch.Tensor:
    """P ``(N, 11)``: 1 where the image shows the concept of :data:`GROUND_TRUTH_CONCEPTS` (its class, its shape,
    its texture), else 0."""
    names = [CLASS_NAMES[label].split(" ") for label in labels.tolist()]
    return torch.tensor(
        [[float(c in (f"{fill} {shape}", shape, fill)) for c in GROUND_TRUTH_CONCEPTS] for fill, shape in names]
    )


def concept_label_maps(masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per category of :data:`MASK_LABELS`, label ids ``(N, H, W)`` from the object masks ``(N, H, W)`` and class
    labels ``(N,)``: the object's shape / texture on its mask (0 elsewhere); region: object 2, background 1."""
    names = [CLASS_NAMES[label].split(" ") for label in labels.tolist()]
    shape_id = torch.tensor([1 + SHAPES.index(shape) for _, shape in names]).view(-1, 1, 1)
    fill_id = torch.tensor([1 + FILLS.index(fill) for fill, _ in names]).view(-1, 1, 1)
    inside = masks.long()
    return {"shape": inside * shape_id, "texture": inside * fill_id, "region": 1 + inside}


def _concept_counts(units: list[dict[str, Any]], flag: str) -> dict[str, int]:
    return dict(Counter(u["concept"] for u in units if u[flag]))


def dissect_tower(
    model,
    processor,
    pixels: torch.Tensor,
    image_concept: dict[str, tuple[torch.Tensor, list[str]]],
    label_maps: dict[str, torch.Tensor],
    settings: DissectionSettings,
    seed: int,
) -> list[dict[str, Any]]:
    """Both methods on every block and unit kind of one tower: one record per (unit kind, block, method, P)."""
    args = DissectionArguments(
        models=["tower"],
        probe_dataset="scenes",
        layers=list(settings.layers),
        summary=settings.summary,
        null_units=settings.null_units,
        mask_size=settings.mask_size,
        seed=seed,
        figure_images=1,
    )
    records = []
    for unit_kind in settings.unit_kinds:
        batches = [
            unit_tokens(model, pixels[i : i + settings.batch_size], processor, settings.layers, unit_kind)[0]
            for i in range(0, len(pixels), settings.batch_size)
        ]
        for layer in settings.layers:
            tokens = torch.cat([batch[layer] for batch in batches])
            where = {"unit_kind": unit_kind, "layer": layer}
            activations = summarize_tokens(tokens, settings.summary)
            for dissector, (matrix, concepts) in image_concept.items():
                summary, units = clip_dissect_layer(activations, matrix, concepts, list(range(len(pixels))), args)
                counts = _concept_counts(units, "labelled")
                records.append({**where, "method": f"clip_dissect/{dissector}", **summary, "concept_counts": counts})
            summary, units = network_dissection_layer(patch_grid(tokens), label_maps, MASK_LABELS, args)
            counts = _concept_counts(units, "detector")
            records.append({**where, "method": "network_dissection", **summary, "concept_counts": counts})
    return records


def run_seed(config, seed: int, settings: DissectionSettings, towers_dir: str | None, threads: int) -> dict[str, Any]:
    """Towers of `seed` (built or loaded), probe set, and every tower's dissection records."""
    towers, tower_seconds = seed_towers(config, seed, VARIANTS, towers_dir, threads)
    clock = time.perf_counter()
    processor = image_processor_for(config.scenes.image_size)
    pixels, masks, labels = probe_set(config, seed, settings.probe_size, processor, settings.mask_size)
    class_vectors = class_embeddings(len(CLASS_NAMES), config.tower.projection_dim, seed)

    def embeds(model) -> torch.Tensor:
        batches = range(0, len(pixels), settings.batch_size)
        return torch.cat(
            [unit_tokens(model, pixels[i : i + settings.batch_size], processor, [0], "mlp")[1] for i in batches]
        )

    tower_embeds = {name: embeds(model) for name, model in towers.items()}
    # Zero-shot accuracy on the probe scenes: checks that these are the laptop experiment's towers.
    accuracy = {
        name: ((e @ class_vectors.T).argmax(dim=1) == labels).double().mean().item() for name, e in tower_embeds.items()
    }
    base_embeds = tower_embeds["base"]
    image_concept = {
        "ground_truth": (ground_truth_concepts(labels), list(GROUND_TRUTH_CONCEPTS)),
        "class_vectors": (image_concept_similarity(base_embeds, class_vectors), list(CLASS_NAMES)),
    }
    label_maps = concept_label_maps(masks, labels)
    identical = all(
        torch.equal(value, towers["base"].state_dict()[key]) for key, value in towers["clean"].state_dict().items()
    )
    records = {}
    for name, model in towers.items():
        if name == "clean" and identical:  # the no-op control: same weights, so the base's dissection exactly
            records[name] = records["base"]
        else:
            records[name] = dissect_tower(model, processor, pixels, image_concept, label_maps, settings, seed)
    return {
        "seed": seed,
        "records": records,
        "clean_weights_equal_base": identical,
        "probe_accuracy": accuracy,
        "seconds": {**tower_seconds, "dissection": time.perf_counter() - clock},
    }


def _run_seed_in_worker(*args) -> dict[str, Any]:
    return run_seed(*args)


def _rows(results: list[dict[str, Any]]) -> dict[tuple, dict[str, list[float]]]:
    """``(method, unit_kind, layer, model) -> metric -> per-seed values`` (in the order of the seeds)."""
    rows: dict[tuple, dict[str, list[float]]] = {}
    for result in results:
        for model, records in result["records"].items():
            for r in records:
                keys = NETDISSECT_KEYS if r["method"] == "network_dissection" else CLIP_DISSECT_KEYS
                entry = rows.setdefault((r["method"], r["unit_kind"], r["layer"], model), {k: [] for k in keys})
                for k in keys:
                    entry[k].append(float(r[k]))
    return rows


def _mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, float)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (method, unit kind, block, model): mean ± std over seeds of each summary number, and for the fine-tunes
    the per-seed difference to ``clean`` (and for ``aft`` to ``random``) with its mean ± std."""
    rows = _rows(results)
    out = []
    for (method, unit_kind, layer, model), metrics in rows.items():
        entry = {"method": method, "unit_kind": unit_kind, "layer": layer, "model": model, "values": metrics}
        entry["mean_std"] = {k: _mean_std(v) for k, v in metrics.items()}
        for reference in ("clean", "random"):
            if model in ("random", "aft") and model != reference:
                other = rows[method, unit_kind, layer, reference]
                deltas = {k: [a - b for a, b in zip(v, other[k])] for k, v in metrics.items()}
                entry[f"minus_{reference}"] = {k: {**_mean_std(d), "per_seed": d} for k, d in deltas.items()}
        out.append(entry)
    return out


def _cell(stats: dict[str, float], digits: int) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def table_markdown(summary: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
    """One table per method and unit kind: per block, each model's mean ± std and AFT − clean / − random (per seed
    too); then the concepts the units take."""
    seeds = [r["seed"] for r in results]
    lines = [f"Mean ± std over seeds {seeds}; Δ = AFT − a control (per seed in brackets).", ""]
    models = list(results[0]["probe_accuracy"])
    lines += ["Zero-shot accuracy on the probe scenes (checks the towers; chance 1/6):", ""]
    lines += ["| seed | " + " | ".join(f"`{m}`" for m in models) + " |", "|" + "---|" * (len(models) + 1)]
    for r in results:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['probe_accuracy'][m]:.3f}" for m in models) + " |")
    lines.append("")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in summary:
        groups.setdefault((entry["method"], entry["unit_kind"]), []).append(entry)
    for (method, unit_kind), entries in groups.items():
        keys = NETDISSECT_KEYS if method == "network_dissection" else CLIP_DISSECT_KEYS
        lines += [f"### {method}, {unit_kind} units", ""]
        header = ["block", "model", *keys]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for entry in sorted(entries, key=lambda e: (e["layer"], ["base", "clean", "random", "aft"].index(e["model"]))):
            digits = {k: 0 if k in ("detectors", "unique_concepts", "unique_detector_concepts") else 3 for k in keys}
            cells = [_cell(entry["mean_std"][k], digits[k] + (1 if digits[k] == 0 else 0)) for k in keys]
            lines.append(f"| {entry['layer']} | `{entry['model']}` | " + " | ".join(cells) + " |")
            for reference in ("clean", "random") if entry["model"] == "aft" else ():
                deltas = entry[f"minus_{reference}"]
                cells = [
                    f"{deltas[k]['mean']:+.3f} ({', '.join(f'{d:+.3g}' for d in deltas[k]['per_seed'])})" for k in keys
                ]
                lines.append(f"| {entry['layer']} | Δ aft − {reference} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n" + concept_table(results)


def concept_table(results: list[dict[str, Any]]) -> str:
    """Per method and unit kind: how many units each model labels (CLIP-Dissect, above the null) or detects
    (Network Dissection) with each concept, summed over the blocks, mean over the seeds."""
    totals: dict[tuple[str, str], dict[str, Counter]] = {}
    for result in results:
        for model, records in result["records"].items():
            for r in records:
                counter = totals.setdefault((r["method"], r["unit_kind"]), {}).setdefault(model, Counter())
                counter.update(r["concept_counts"])
    lines = ["### Concepts of the labelled units / detectors (all blocks, mean over seeds)", ""]
    lines += ["| method | units | model | concepts |", "|---|---|---|---|"]
    for (method, unit_kind), models in totals.items():
        for model, counter in models.items():
            concepts = ", ".join(f"{c} {n / len(results):.1f}" for c, n in counter.most_common()) or "none"
            lines.append(f"| {method} | {unit_kind} | `{model}` | {concepts} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Folder for results.json and table.md.")
    parser.add_argument(
        "--towers",
        default=None,
        help="Folder of saved towers: loaded when built from the same "
        "configuration, else built and saved there (default: built, not saved).",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe_size", type=int, default=500, help="Test scenes per seed in the probe set.")
    parser.add_argument("--workers", type=int, default=2, help="Seeds run in parallel processes (one per core).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: reproducible).")
    parser.add_argument("--smoke", action="store_true", help="Toy sizes, seconds: checks the pipeline only.")
    args = parser.parse_args(argv)
    if args.probe_size < 2:
        raise ValueError(f"--probe_size={args.probe_size} must be at least 2 scenes.")
    config = SMOKE_CONFIG if args.smoke else FINAL_CONFIG
    layers = tuple(range(config.tower.layers))
    settings = DissectionSettings(
        probe_size=args.probe_size,
        layers=layers,
        null_units=100 if args.smoke else 1000,
        mask_size=8 if args.smoke else 24,
    )

    start = time.perf_counter()
    jobs = [(config, seed, settings, args.towers, args.threads) for seed in args.seeds]
    if args.workers <= 1:
        results = [run_seed(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_run_seed_in_worker, *zip(*jobs)))
    summary = summarize(results)
    report = {
        "command": "python experiments/dissection/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config.to_dict(),
        "settings": dataclasses.asdict(settings),
        "concepts": {"ground_truth": list(GROUND_TRUTH_CONCEPTS), "class_vectors": list(CLASS_NAMES)},
        "mask_labels": MASK_LABELS,
        "summary": summary,
        "seeds": results,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": args.threads,
            "workers": args.workers,
        },
        "seconds_total": time.perf_counter() - start,
    }
    os.makedirs(args.output, exist_ok=True)
    write_json_atomic(os.path.join(args.output, "results.json"), report)
    table = table_markdown(summary, results)
    write_text_atomic(os.path.join(args.output, "table.md"), table)
    print(table)
    print(f"Wrote {args.output} in {report['seconds_total']:.0f} s.")
    return report


if __name__ == "__main__":
    main()
