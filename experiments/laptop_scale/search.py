"""The hyper-parameter search, logged: every configuration tried, on a held-out seed and the validation split.

    python experiments/laptop_scale/search.py --stage eps_lr --log experiments/laptop_scale/results/search_log.jsonl
    python experiments/laptop_scale/search.py --summary --log experiments/laptop_scale/results/search_log.jsonl

The primary metric (energy pointing game of Simple Gradient, :data:`measure.PRIMARY_METRIC`) was fixed before the
search. The search runs on :data:`SEARCH_SEED` and the ``validation`` split, never on the seeds or the test split
of the reported table. Selection rule (fixed with the metric): the configuration with the largest validation gain
of the primary metric (AFT − base) among those whose AFT accuracy stays at least twice chance (1/3). Stages were
run in the order of :data:`STAGES`; a later stage's grid was written after reading the earlier ones (the comment
above each says why). Each configuration appends one JSON line to the log; configurations already in the log are
skipped, so a stage can be resumed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from experiment import ExperimentConfig, run_seed  # noqa: E402
from measure import METRIC_NAMES, PRIMARY_METRIC  # noqa: E402

SEARCH_SEED = 100
SEARCH_VARIANTS = ("aft",)


def _config(finetune: dict | None = None, tower: dict | None = None, scenes: dict | None = None) -> ExperimentConfig:
    base = ExperimentConfig(variants=SEARCH_VARIANTS)
    return dataclasses.replace(
        base,
        finetune=dataclasses.replace(base.finetune, **(finetune or {})),
        tower=dataclasses.replace(base.tower, **(tower or {})),
        scenes=dataclasses.replace(base.scenes, **(scenes or {})),
    )


STAGES: dict[str, dict[str, ExperimentConfig]] = {
    # Stage 1: the radius and the learning rate at the default tower (32 px, patch 8, width 64, 4 layers).
    "eps_lr": {
        f"eps{eps:g}-lr{lr:g}": _config({"eps": eps, "learning_rate": lr})
        for eps in (4.0, 8.0, 16.0, 32.0)
        for lr in (1e-4, 1e-3)
    },
    # Stage 2, around the best of stage 1 (ε 4-8: gain ≈ +0.08-0.09; ε ≥ 16 destroys accuracy): twice the
    # steps, and the penalty/smoothing scale η = σ at half and twice the paper's ratio to ε.
    "steps_eta_sigma": {
        **{
            f"eps{eps:g}-lr0.001-steps300": _config({"eps": eps, "learning_rate": 1e-3, "steps": 300})
            for eps in (4.0, 8.0)
        },
        **{
            f"eps8-lr0.001-eta_sigma{ratio:g}eps": _config(
                {"eps": 8.0, "learning_rate": 1e-3, "eta_ratio": ratio, "sigma_ratio": ratio}
            )
            for ratio in (0.125, 0.5)
        },
    },
    # Stage 3, the model and the image at ε = 8, lr 1e-3 (stage 2: the gain is flat in steps, η and σ, while accuracy
    # falls): a twice wider tower, and 48-pixel scenes (everything scaled by 1.5, patch 12: the same 4x4 token grid).
    "tower_image": {
        "eps8-lr0.001-width128": _config({"eps": 8.0, "learning_rate": 1e-3}, tower={"width": 128}),
        "eps8-lr0.001-image48": _config(
            {"eps": 8.0, "learning_rate": 1e-3},
            tower={"image_size": 48, "patch_size": 12},
            scenes={"image_size": 48, "object_size": (18, 27), "stripe_period": 6.0},
        ),
    },
}


def _name_in_log(path: str) -> set[str]:
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {json.loads(line)["name"] for line in f if line.strip()}


def run_stage(stage: str, log_path: str) -> None:
    """Run every configuration of `stage` not yet in the log, appending one line each."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} is not one of {list(STAGES)}.")
    done = _name_in_log(log_path)
    cache: dict = {}
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    for name, config in STAGES[stage].items():
        if name in done:
            continue
        result = run_seed(config, SEARCH_SEED, split="validation", base_cache=cache)
        line = {"stage": stage, "name": name, "config": config.to_dict(), **result.to_dict()}
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        delta = result.metrics["aft"][PRIMARY_METRIC] - result.metrics["base"][PRIMARY_METRIC]
        print(f"{stage}/{name}: Δ {PRIMARY_METRIC} (aft − base) = {delta:+.4f}", flush=True)


def summary(log_path: str) -> str:
    """Markdown table of every logged configuration: base and AFT value of each metric."""
    header = ["stage", "configuration", *(f"{m} base → aft" for m in METRIC_NAMES)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with open(log_path, encoding="utf-8") as f:
        for raw in f:
            entry = json.loads(raw)
            base, aft = entry["metrics"]["base"], entry["metrics"]["aft"]
            cells = [f"{base[m]:.3f} → {aft[m]:.3f}" for m in METRIC_NAMES]
            lines.append("| " + " | ".join([entry["stage"], entry["name"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=list(STAGES), help="Run this stage's configurations.")
    parser.add_argument("--summary", action="store_true", help="Print the markdown table of the log.")
    parser.add_argument("--log", default=os.path.join(os.path.dirname(__file__), "results", "search_log.jsonl"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: reproducible, robust to load).")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage:
        run_stage(args.stage, args.log)
    if args.summary:
        print(summary(args.log))


if __name__ == "__main__":
    main()
