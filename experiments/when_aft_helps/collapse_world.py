"""A base that already localises: does AFT (the laptop experiment's final configuration) collapse it, and does the
library's map monitor catch it?

    python experiments/when_aft_helps/collapse_world.py --probe --worlds <names> --output <folder>
    python experiments/when_aft_helps/collapse_world.py --worlds <name> --seeds 0 --output <folder>
    python experiments/when_aft_helps/collapse_world.py --worlds <name> --seeds 0 --variants aft_best --output <folder>

Issue 19 reported, on a world outside this repository (64-px scenes, 8 × 8 tokens, a base whose Simple-Gradient
maps already sit on the object and whose embeddings are bunched: mean pairwise cosine 0.96), that AFT at ε 8/255 and
lr 1e-3 collapsed the encoder to one output. The worlds of :data:`study.WORLDS` never reached such a base. The
worlds of :data:`WORLDS` here move the dials towards it: 64-px scenes with an 8 × 8 token grid, sparse clutter,
smaller objects, and a low pre-training temperature (:attr:`pretrain.PretrainSpec.logit_scale`): with cosine logits
scaled by 100 instead of 10, a small angle between the class directions already gives a confident prediction, so
the embeddings need not spread out to fit the classes.

``--probe`` pre-trains and measures the bases only (is the regime reached?). A full job (one world and seed) then
fine-tunes the base with the laptop experiment's final fine-tuning (:data:`run.FINAL_CONFIG`: ε 8, lr 1e-3, 150 steps
of batch 64, K = 10) once per run of :data:`RUNS`, with the library's map monitor attached as the laptop
``--monitor_images`` path does (one :class:`MapMonitorCallback` every ``monitor_steps`` steps on held-out validation
scenes):

- ``aft_no_stop``: the monitor only watches (``stop_after_collapses=0``): what AFT does when nothing stops it;
- ``aft_monitored``: stop after two collapsed measurements in a row (``stop_after_collapses=2``, the library's
  default until the collapse fix), otherwise the laptop ``--monitor_images`` path: no ``metric_for_best_model``, no
  checkpoints;
- ``aft_best``: the monitor's current defaults, a checkpoint at every measurement, and
  ``metric_for_best_model=energy_pointing_game`` with ``load_best_model_at_end`` (:func:`selection_overrides`): the
  Trainer exports the best checkpoint, the base competing.

``--variants`` runs some of them only; on a job already in results.json their records are merged into its entry.

Every model is measured on the test scenes (:func:`measure.evaluate_tower`) plus how bunched its embeddings are.
Results go to ``<output>/results.json`` (rewritten atomically after every probe or job). ``--smoke`` runs a toy world
in seconds; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
# This study's modules, and the laptop-scale ones they reuse (as study.py does).
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "laptop_scale")]

from experiment import ExperimentConfig, World, prepare_world, validation_monitor  # noqa: E402
from finetune import FinetuneSpec, finetune  # noqa: E402
from measure import PRIMARY_METRIC, evaluate_tower  # noqa: E402
from run import FINAL_CONFIG  # noqa: E402
from study import SMOKE_WORLD, _same_weights, _world  # noqa: E402

from hf_clip_aft.files import write_json_atomic  # noqa: E402
from hf_clip_aft.interpret import zero_shot_predictions  # noqa: E402
from hf_clip_aft.interpret.monitor import MonitorSettings, majority_share  # noqa: E402
from hf_clip_aft.modeling import embed_fn  # noqa: E402


def _collapse_world(logit_scale: float = 10.0, pretrain_steps: int = 300) -> ExperimentConfig:
    """64-px scenes, 8 × 8 tokens (patch 8), 0-2 clutter items, objects 20-30 px (about 12 % of the scene)."""
    return _world(
        image_size=64,
        patch=8,
        object_size=(20, 30),
        clutter_items=(0, 2),
        logit_scale=logit_scale,
        pretrain_steps=pretrain_steps,
    )


WORLDS: dict[str, ExperimentConfig] = {
    "grid8_64px": _collapse_world(),
    "grid8_64px_cold": _collapse_world(logit_scale=100.0),
    # Added after the first two probes: the cold base was bunched but had barely learnt (accuracy 0.23).
    "grid8_64px_cold_long": _collapse_world(logit_scale=100.0, pretrain_steps=1000),
    "grid8_64px_cool_long": _collapse_world(logit_scale=30.0, pretrain_steps=1000),
    # Added after those four probes: cold_long came closest to the regime (bunched, not brittle), its maps less sharp.
    "grid8_64px_cold_2000": _collapse_world(logit_scale=100.0, pretrain_steps=2000),
}
WORLD_DIALS = {
    "grid8_64px": "64 px, 8×8 tokens, 0-2 clutter items, objects 20-30 px, logit scale 10, 300 pre-training steps",
    "grid8_64px_cold": "as grid8_64px with logit scale 100 (low pre-training temperature)",
    "grid8_64px_cold_long": "as grid8_64px_cold with 1000 pre-training steps",
    "grid8_64px_cool_long": "as grid8_64px with logit scale 30 and 1000 pre-training steps",
    "grid8_64px_cold_2000": "as grid8_64px_cold with 2000 pre-training steps",
}
FINETUNE: FinetuneSpec = FINAL_CONFIG.finetune
SMOKE_FINETUNE = FinetuneSpec(steps=4, batch_size=8, attack_steps=2, monitor_steps=1)
MONITOR_IMAGES = 64
# The AFT runs of a full job: the MonitorSettings fields each sets (beyond max_images; the rest are the library's
# defaults), and whether it selects the best checkpoint (selection_overrides).
RUNS: dict[str, tuple[dict[str, int], bool]] = {
    "aft_no_stop": ({"stop_after_collapses": 0}, False),
    "aft_monitored": ({"stop_after_collapses": 2}, False),  # the library's default until the collapse fix
    "aft_best": ({}, True),  # added after the first jobs: the runs before it have the other two only
}


def selection_overrides(spec: FinetuneSpec) -> dict[str, Any]:
    """`AFTConfig` fields of a run that exports its best checkpoint by the maps: a checkpoint at every monitor
    measurement (evaluation and save every ``spec.monitor_steps`` steps, as load_best_model_at_end requires), the
    best by :data:`measure.PRIMARY_METRIC`; the monitor makes the base a candidate."""
    every = spec.monitor_steps
    return {
        "eval_strategy": "steps",
        "eval_steps": every,
        "save_strategy": "steps",
        "save_steps": every,
        "metric_for_best_model": PRIMARY_METRIC,
        "load_best_model_at_end": True,
    }


def bunching(embeds: torch.Tensor) -> dict[str, float]:
    """How bunched unit embeddings ``(N, D)`` are: mean pairwise cosine (self-pairs excluded), mean cosine to their
    mean direction, and the FARE loss ``mean ||m − e||²`` of an encoder that outputs that mean direction m for every
    image (what a collapse to a constant costs under AFT's loss, before any attack)."""
    n = len(embeds)
    gram = embeds @ embeds.t()
    pairwise = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
    to_mean = embeds @ F.normalize(embeds.mean(dim=0), dim=0)
    return {
        "mean_pairwise_cosine": pairwise,
        "cosine_to_mean_direction": float(to_mean.mean()),
        "constant_encoder_fare_loss": float((2 - 2 * to_mean).mean()),
    }


def measure_model(model: Any, world: World, seed: int, spec: FinetuneSpec) -> dict[str, float]:
    """Test-split metrics of :func:`measure.evaluate_tower` (robustness at the fine-tuning's ε) and the bunching
    of the clean embeddings, with the share of the most-predicted class."""
    metrics = evaluate_tower(
        model,
        world.processor,
        world.eval_pixels,
        world.eval_masks,
        world.eval_labels,
        world.class_embeds,
        spec.eps,
        seed,
        attack_steps=spec.attack_steps,
        faithfulness=False,
    )[0]
    with torch.no_grad():
        embeds = embed_fn(model, world.processor)(world.eval_pixels)
    predictions = zero_shot_predictions(embeds, world.class_embeds)
    return {**metrics, **bunching(embeds), "majority_share": majority_share(predictions)}


def environment() -> dict[str, Any]:
    """Where and when a probe, job or run finished."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def run_job(name: str, config: ExperimentConfig, seed: int, spec: FinetuneSpec, variants: list[str]) -> dict[str, Any]:
    """Pre-train the base of (`config`, `seed`) and measure it; fine-tune it with AFT as each run of `variants`
    (names of :data:`RUNS`; none for a probe) and measure each (see the module docstring)."""
    clock = time.perf_counter()
    world = prepare_world(config, seed, "test")
    entry: dict[str, Any] = {
        "world": name,
        "seed": seed,
        "dials": WORLD_DIALS.get(name, "smoke"),
        "config": config.to_dict(),
        "mask_share": float(world.eval_masks.float().mean()),
        "pretrain_loss": world.pretrain_loss,
        "pretrain_seconds": world.seconds["pretrain"],
        "base": measure_model(world.base, world, seed, spec),
    }
    if variants:
        entry["finetune"] = dataclasses.asdict(spec)
        images = min(MONITOR_IMAGES, config.eval_size)
        entry["monitor_images"] = images
        entry["runs"] = {}
        for run_name in variants:
            monitor_fields, select_best = RUNS[run_name]
            settings = MonitorSettings(max_images=images, **monitor_fields)
            overrides = selection_overrides(spec) if select_best else {}
            start = time.perf_counter()
            monitor = validation_monitor(world, config, seed, images, settings)
            result = finetune(
                world.base, world.processor, world.train_images, "aft", spec, seed, overrides=overrides, monitor=monitor
            )
            evaluation = result.training_evaluation
            collapsed = evaluation["collapsed_steps"]
            entry["runs"][run_name] = {
                "monitor_settings": dataclasses.asdict(settings),
                "overrides": overrides,
                "steps_trained": max((log["step"] for log in result.log_history), default=0),
                "loss_log": [{"step": log["step"], "loss": log["loss"]} for log in result.log_history if "loss" in log],
                "metrics": measure_model(result.model, world, seed, spec),
                "exported_is_base_weights": _same_weights(result.model, world.base),
                # The monitor's flags, by measured step (the step-0 base included; never collapsed).
                "collapsed_by_step": {
                    str(point["step"]): point["step"] in collapsed for point in evaluation["history"]
                },
                "training_evaluation": evaluation,
                "seconds": time.perf_counter() - start,
                "environment": environment(),
            }
            print(f"{name}/seed{seed} {run_name}: {evaluation['verdict']}", flush=True)
    entry["seconds"] = time.perf_counter() - clock
    return entry


TABLE_COLUMNS = (
    ("EPG", PRIMARY_METRIC),
    ("PG", "pointing_game"),
    ("Gini", "gini"),
    ("acc", "accuracy"),
    ("robust acc", "robust_accuracy"),
    ("attack cos", "attack_cosine"),
    ("pairwise cos", "mean_pairwise_cosine"),
    ("cos to mean", "cosine_to_mean_direction"),
    ("top class", "majority_share"),
)


def table_markdown(report: dict[str, Any]) -> str:
    """One row per model of every job in `report` (the base, and each AFT run of a full job) on the test split."""
    header = [
        "job",
        "model",
        "mask share",
        *(label for label, _ in TABLE_COLUMNS),
        "steps",
        "exported",
        "first warning",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, job in report["jobs"].items():
        models = {"base": {"metrics": job["base"]}, **job.get("runs", {})}
        for model, run in models.items():
            evaluation = run.get("training_evaluation") or {}
            warnings = evaluation.get("warnings") or ["none"]
            cells = [key, model, f"{job['mask_share']:.3f}", *(f"{run['metrics'][m]:.3f}" for _, m in TABLE_COLUMNS)]
            exported = evaluation.get("exported_step", "")
            cells += [str(run.get("steps_trained", "")), str(exported), warnings[0] if evaluation else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def record_job(folder: str, key: str, entry: dict[str, Any], merge_runs: bool) -> dict[str, Any]:
    """Write `entry` as job `key` of ``<folder>/results.json`` and return the whole report.

    Earlier probes and jobs are kept: the file is read just before writing, under a lock on `folder`, so that
    processes running in parallel all land. A job run again replaces its entry; with `merge_runs` only its runs are
    added to the recorded entry (its other fields kept), each with its command and whether the base, pre-trained and
    measured again, equals the recorded one bit for bit.
    """
    path = os.path.join(folder, "results.json")
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report: dict[str, Any] = {"jobs": {}}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                report = json.load(f)
        recorded = report["jobs"].get(key)
        if merge_runs and recorded is not None:
            for run in entry["runs"].values():
                run.update(command=entry["command"], base_as_recorded=entry["base"] == recorded["base"])
            entry = {**recorded, "runs": {**recorded.get("runs", {}), **entry["runs"]}}
        report["jobs"][key] = entry
        write_json_atomic(path, report)
    finally:
        os.close(lock)  # releases the lock
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Folder for results.json.")
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), help=f"Worlds to run, of {list(WORLDS)}.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--probe", action="store_true", help="Pre-train and measure the bases only.")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(RUNS),
        default=list(RUNS),
        help="AFT runs of a full job; fewer than all are merged into the job's recorded entry.",
    )
    parser.add_argument("--smoke", action="store_true", help="One toy world, seconds: checks the pipeline only.")
    parser.add_argument("--report_only", action="store_true", help="Only print the table of <output>/results.json.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # reproducible, and fair to a shared machine
    worlds, spec = ({"smoke": SMOKE_WORLD}, SMOKE_FINETUNE) if args.smoke else (WORLDS, FINETUNE)
    unknown = [name for name in args.worlds if name not in worlds] if not args.smoke else []
    if unknown:
        raise ValueError(f"--worlds {unknown}: unknown; choose among {list(worlds)}.")
    names = list(worlds) if args.smoke else args.worlds
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "results.json")
    report: dict[str, Any] = {"jobs": {}}
    if args.report_only:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        names = []
    variants = [] if args.probe else list(dict.fromkeys(args.variants))
    command = "python experiments/when_aft_helps/collapse_world.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for name in names:
        for seed in args.seeds:
            entry = run_job(name, worlds[name], seed, spec, variants)
            key = f"{name}/seed{seed}/{'probe' if args.probe else 'full'}"
            entry = {**entry, "command": command, "environment": environment()}
            report = record_job(args.output, key, entry, merge_runs=bool(variants) and set(variants) != set(RUNS))
            base = entry["base"]
            print(
                f"{key}: base EPG {base[PRIMARY_METRIC]:.3f} (mask share {entry['mask_share']:.3f}), accuracy "
                f"{base['accuracy']:.3f}, mean pairwise cosine {base['mean_pairwise_cosine']:.3f}, attack cosine "
                f"{base['attack_cosine']:.3f}; {entry['seconds']:.0f} s",
                flush=True,
            )
    print(table_markdown(report))
    return report


if __name__ == "__main__":
    main()
