"""Laptop-scale evidence for AFT: what adversarial fine-tuning does to Simple-Gradient saliency, with controls.

    python experiments/laptop_scale/run.py --output experiments/laptop_scale/results

For each seed: synthetic scenes with object masks, a small CLIP vision tower pre-trained from scratch against fixed
class embeddings (the base), then fine-tuned from that same base by the library's `AFTTrainer` in every variant of
:data:`finetune.VARIANTS` (same loss, steps and data order), and every model evaluated on the held-out test scenes
with the library's evaluation suite. Writes into ``--output``:

- ``results.json``: the configuration, per-seed metrics, fine-tuning logs, timings, and mean ± std over seeds;
- ``table.md``: the mean ± std table and the per-seed values of the primary metric;
- ``saliency_base_vs_aft.png``: Simple-Gradient maps of every model on the first test scenes of the first seed;
- ``surgery_2x2.png``: maps of ``base`` and ``aft`` with Simple Gradient and the training-free dense maps of
  :data:`measure.SURGERY_METHODS` (CLIP Surgery, NACLIP) on the same scenes.

Every model is measured with Simple Gradient and with those dense maps (``<metric>@<method>`` in the results).

``--figures_from TOWERS`` only redraws the two figures of the run already in ``--output`` from its first seed's
saved towers (no training; each tower must reproduce that run's metrics).

Seeds run in ``--workers`` processes (default 2, one per core) of ``--threads`` torch threads (default 1: with one
thread a seed gives bit-identical numbers on a rerun). ``--smoke`` runs the same pipeline at toy sizes in seconds
(the test suite uses it); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import torch
import transformers
from transformers import CLIPVisionModelWithProjection

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from experiment import ExperimentConfig, SeedResult, evaluate_model, evaluation_data, run_seed  # noqa: E402
from finetune import VARIANT_DESCRIPTIONS, VARIANTS, FinetuneSpec  # noqa: E402
from measure import DENSE_METRIC_NAMES, HIGHER_IS_BETTER, METRIC_NAMES, PRIMARY_METRIC, SURGERY_METHODS  # noqa: E402
from pretrain import PretrainSpec, TowerSpec  # noqa: E402
from scenes import CLASS_NAMES, SceneSpec  # noqa: E402
from search import STAGES  # noqa: E402

from hf_clip_aft.files import read_json, write_json_atomic, write_text_atomic  # noqa: E402
from hf_clip_aft.interpret import saliency_grid  # noqa: E402

FIGURE_NAME = "saliency_base_vs_aft.png"
SURGERY_FIGURE_NAME = "surgery_2x2.png"

# The final configuration: the one the logged search (search.py, RESULTS.md) selected on the validation split, with
# every variant.
FINAL_STAGE, FINAL_NAME = "tower_image", "eps8-lr0.001-image48"
FINAL_CONFIG = dataclasses.replace(STAGES[FINAL_STAGE][FINAL_NAME], variants=VARIANTS)

# Toy sizes: every stage runs, in seconds.
SMOKE_CONFIG = ExperimentConfig(
    scenes=SceneSpec(image_size=16, object_size=(6, 9), clutter_items=(3, 5)),
    tower=TowerSpec(image_size=16, width=16, layers=1, heads=2, projection_dim=8),
    pretrain=PretrainSpec(steps=5, batch_size=16, warmup=1),
    finetune=FinetuneSpec(steps=2, batch_size=8, attack_steps=2),
    train_size=64,
    eval_size=20,
)


def _run_seed_in_worker(
    config: ExperimentConfig, seed: int, figure_images: int, threads: int, monitor_images: int = 0
) -> SeedResult:
    torch.set_num_threads(threads)
    return run_seed(config, seed, "test", figure_images, surgery_maps=True, monitor_images=monitor_images)


def run_seeds(
    config: ExperimentConfig,
    seeds: list[int],
    figure_images: int,
    workers: int,
    threads: int,
    monitor_images: int = 0,
) -> list[SeedResult]:
    """Every seed, in `workers` processes of `threads` torch threads each (results in the order of `seeds`)."""
    if workers <= 1:
        return [_run_seed_in_worker(config, seed, figure_images, threads, monitor_images) for seed in seeds]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_run_seed_in_worker, config, seed, figure_images, threads, monitor_images) for seed in seeds
        ]
        return [future.result() for future in futures]


def mean_std(results: list[SeedResult]) -> dict[str, dict[str, dict[str, float]]]:
    """``model -> metric -> {"mean", "std"}`` over the seeds (sample std, ddof = 1; 0 for a single seed)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for model in results[0].metrics:
        summary[model] = {}
        for metric in results[0].metrics[model]:
            values = np.array([r.metrics[model][metric] for r in results])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[model][metric] = {"mean": float(values.mean()), "std": std}
    return summary


def table_markdown(results: list[SeedResult], summary: dict) -> str:
    """The mean ± std table (one row per model) and the per-seed values of the primary metric."""
    arrows = {m: "↑" if HIGHER_IS_BETTER[m] else "↓" for m in METRIC_NAMES}
    header = ["model", *(f"{m} {arrows[m]}" for m in METRIC_NAMES)]
    lines = [
        f"Mean ± std over seeds {[r.seed for r in results]} (test split). Primary metric: {PRIMARY_METRIC}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for model, metrics in summary.items():
        cells = [f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" for m in METRIC_NAMES]
        lines.append("| " + " | ".join([f"`{model}`", *cells]) + " |")
    lines += ["", f"Per seed, {PRIMARY_METRIC} (and its difference to `base`):", ""]
    models = list(summary)
    lines += ["| seed | " + " | ".join(f"`{m}`" for m in models) + " |", "|" + "---|" * (len(models) + 1)]
    for r in results:
        values = {m: r.metrics[m][PRIMARY_METRIC] for m in models}
        cells = [f"{values[m]:.4f}" + ("" if m == "base" else f" ({values[m] - values['base']:+.4f})") for m in models]
        lines.append(f"| {r.seed} | " + " | ".join(cells) + " |")
    lines += ["", "Models:", *(f"- `{m}`: {VARIANT_DESCRIPTIONS[m]}" for m in models)]
    return "\n".join(lines) + "\n" + surgery_table_markdown(results, summary)


def surgery_table_markdown(results: list[SeedResult], summary: dict) -> str:
    """{model} × {Simple Gradient, each dense method}: mean ± std of :data:`DENSE_METRIC_NAMES`, and the per-seed
    energy pointing game gain of every variant over ``base`` with each map method."""
    methods = ["simple_gradient", *SURGERY_METHODS]

    def key(metric: str, method: str) -> str:
        return metric if method == "simple_gradient" else f"{metric}@{method}"

    lines = ["", "Maps: Simple Gradient and the training-free dense maps (true class), mean ± std over seeds:", ""]
    header = ["model", *(f"{metric} ({method})" for metric in DENSE_METRIC_NAMES for method in methods)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, metrics in summary.items():
        cells = [
            f"{metrics[key(metric, method)]['mean']:.3f} ± {metrics[key(metric, method)]['std']:.3f}"
            for metric in DENSE_METRIC_NAMES
            for method in methods
        ]
        lines.append("| " + " | ".join([f"`{model}`", *cells]) + " |")
    lines += ["", f"Per seed, {PRIMARY_METRIC} gain over `base` (variant − base) with each map method:", ""]
    variants = [model for model in summary if model != "base"]
    lines += ["| seed | method | " + " | ".join(f"`{v}`" for v in variants) + " |", "|" + "---|" * (len(variants) + 2)]
    for r in results:
        for method in methods:
            name = key(PRIMARY_METRIC, method)
            cells = [f"{r.metrics[v][name] - r.metrics['base'][name]:+.4f}" for v in variants]
            lines.append(f"| {r.seed} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_figure(result: SeedResult, path: str) -> None:
    """Simple-Gradient maps of every model on the same test scenes (the first seed's first images)."""
    models = list(result.figure_maps)
    maps = {("simple_gradient", model): result.figure_maps[model]["simple_gradient"] for model in models}
    titles = [CLASS_NAMES[label] for label in result.figure_labels]
    saliency_grid(
        result.figure_pixels, maps, models, ["simple_gradient"], path, cell=64, titles=titles, masks=result.figure_masks
    )


def write_surgery_figure(result: SeedResult, path: str) -> None:
    """{base, aft} × {Simple Gradient, CLIP Surgery, NACLIP} maps on the same test scenes (the first seed's)."""
    methods, models = ["simple_gradient", *SURGERY_METHODS], ["base", "aft"]
    maps = {(method, model): result.figure_maps[model][method] for method in methods for model in models}
    titles = [CLASS_NAMES[label] for label in result.figure_labels]
    saliency_grid(result.figure_pixels, maps, models, methods, path, cell=64, titles=titles, masks=result.figure_masks)


def redraw_figures(output: str, towers: str, figure_images: int, tolerance: float = 1e-4) -> SeedResult:
    """Redraw both figures of the finished run in `output` from its first seed's saved towers, without training.

    `towers` holds ``seed<k>/<model>`` folders (``save_pretrained``; ``experiments/dissection/towers.py`` saves the
    laptop towers so) for ``base`` and every variant of ``output/results.json``. Each tower is measured again on the
    seed's test scenes and must give that file's metrics, so that the figures show the models the numbers are about:
    within `tolerance`, and a pointing game within one scene (its arg-max may flip on a near-tie). Towers that do
    not are refused, naming every metric that differs.
    """
    report = read_json(output, _check_report)
    recorded = report["seeds"][0]
    seed, models = recorded["seed"], ["base", *report["config"]["variants"]]
    config = ExperimentConfig.from_dict(report["config"])
    data = evaluation_data(config, seed, "test")
    metrics, maps, differences = {}, {}, []
    for model in models:
        folder = os.path.join(towers, f"seed{seed}", model)
        tower = CLIPVisionModelWithProjection.from_pretrained(folder)
        metrics[model], maps[model] = evaluate_model(tower, data, config, seed, figure_images, surgery_maps=True)
        for name, value in recorded["metrics"][model].items():
            allowed = 1 / config.eval_size + 1e-9 if name.startswith("pointing_game") else tolerance
            if abs(metrics[model][name] - value) > allowed:
                differences.append(f"{model} {name}: {metrics[model][name]!r} here, {value!r} in results.json")
    if differences:
        raise ValueError(
            f"The towers in {towers} are not the models {output}/results.json measured on seed {seed}'s test scenes ("
            + "; ".join(differences)
            + "). Pass the towers of that run, or rerun the experiment (which draws the figures)."
        )
    result = SeedResult(
        seed=seed,
        metrics=metrics,
        pretrain_final_loss=recorded["pretrain_final_loss"],
        train_logs=recorded["train_logs"],
        same_data_order=recorded["same_data_order"],
        seconds=recorded["seconds"],
        figure_pixels=data.eval_pixels[:figure_images],
        figure_labels=data.eval_labels[:figure_images].tolist(),
        figure_masks=data.eval_masks[:figure_images],
        figure_maps=maps,
    )
    write_figure(result, os.path.join(output, FIGURE_NAME))
    write_surgery_figure(result, os.path.join(output, SURGERY_FIGURE_NAME))
    return result


def _check_report(report: dict) -> None:
    if not report.get("seeds") or "metrics" not in report["seeds"][0]:
        raise ValueError("results.json has no per-seed metrics; give the --output folder of a finished run.")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Folder for results.json, table.md and the figure.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="Seeds run in parallel processes (one per core).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (1: reproducible).")
    parser.add_argument("--figure_images", type=int, default=6, help="Rows of the saliency figure.")
    parser.add_argument("--smoke", action="store_true", help="Toy sizes, seconds: checks the pipeline only.")
    parser.add_argument(
        "--monitor_images",
        type=int,
        default=0,
        help="Fine-tune with the library's map monitor on this many validation scenes (0: off), every "
        "--monitor_steps steps; the verdicts go into results.json and the output.",
    )
    parser.add_argument("--monitor_steps", type=int, default=15, help="Optimiser steps between measurements.")
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="Fine-tuning variants (default: all)."
    )
    parser.add_argument(
        "--figures_from",
        default=None,
        help="Only redraw the figures of the run already in --output, from its first seed's saved towers in this "
        "folder (seed<k>/<model>, as experiments/dissection/towers.py saves them): no training.",
    )
    args = parser.parse_args(argv)
    if args.figure_images < 1:
        raise ValueError(f"--figure_images={args.figure_images} must be at least 1.")
    if args.figures_from:
        torch.set_num_threads(args.threads)
        redraw_figures(args.output, args.figures_from, args.figure_images)
        print(f"Redrew {FIGURE_NAME} and {SURGERY_FIGURE_NAME} in {args.output}.")
        return read_json(args.output, _check_report)
    if "aft" not in args.variants:
        raise ValueError(f"--variants={args.variants} must include 'aft' (the figures compare it with the base).")
    config = dataclasses.replace(SMOKE_CONFIG if args.smoke else FINAL_CONFIG, variants=tuple(args.variants))
    config = dataclasses.replace(
        config, finetune=dataclasses.replace(config.finetune, monitor_steps=args.monitor_steps)
    )

    start = time.perf_counter()
    results = run_seeds(config, args.seeds, args.figure_images, args.workers, args.threads, args.monitor_images)
    summary = mean_std(results)
    os.makedirs(args.output, exist_ok=True)
    report = {
        "command": "python experiments/laptop_scale/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": config.to_dict(),
        "primary_metric": PRIMARY_METRIC,
        "summary": summary,
        "seeds": [r.to_dict() for r in results],
        "same_data_order": all(r.same_data_order for r in results),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": args.threads,
            "workers": args.workers,
            "processor": platform.processor() or platform.machine(),
        },
        "seconds_total": time.perf_counter() - start,
    }
    write_json_atomic(os.path.join(args.output, "results.json"), report)
    write_text_atomic(os.path.join(args.output, "table.md"), table_markdown(results, summary))
    write_figure(results[0], os.path.join(args.output, FIGURE_NAME))
    write_surgery_figure(results[0], os.path.join(args.output, SURGERY_FIGURE_NAME))
    print(table_markdown(results, summary))
    for result in results:
        for variant, evaluation in result.training_evaluations.items():
            print(f"seed {result.seed}, {variant}: {evaluation['verdict']}")
    print(f"Wrote {args.output} in {report['seconds_total']:.0f} s.")
    return report


if __name__ == "__main__":
    main()
