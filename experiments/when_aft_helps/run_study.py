"""When does AFT help? Runs the study of :mod:`study` and writes its results, table and figure.

    python experiments/when_aft_helps/run_study.py --output experiments/when_aft_helps/results

Jobs (one world and seed each, see :data:`JOBS`) run in ``--workers`` processes of one torch thread, in the order of
:data:`JOBS` (most informative first). Each finished job appends one JSON line to ``<output>/jobs.jsonl``; jobs
already there are skipped, so a stopped run resumes. Then ``results.json`` (every job, and one summary row per
(world, learning rate, ε) cell), ``table.md`` and ``delta_epg.png`` are written from the jobs in the log.
``--smoke`` runs a toy world in seconds (the test suite uses it); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study import EPSILONS, LEARNING_RATES, SMOKE_SPEC, SMOKE_WORLD, WORLD_DIALS, WORLDS, StudySpec, run_job

from hf_clip_aft.files import atomic_write, write_text_atomic
from hf_clip_aft.interpret.monitor import MonitorSettings

FIGURE_NAME = "delta_epg.png"
# |ΔEPG| up to this is "neutral": the guard's tolerance, and about the seed-to-seed spread of paired differences.
NEUTRAL_BAND = 0.02
FULL_GRID = [(lr, eps) for lr in LEARNING_RATES for eps in EPSILONS]
# The cells every world gets; lr 1e-5 moves nothing in 30 steps (the full grid shows it), so it is left to the
# full-grid jobs.
CORE_CELLS = [(1e-4, 4.0), (1e-3, 4.0), (1e-3, 8.0)]
# (world, seed, cells), most informative first: the full grid on the reference world, seed 0 of the worlds with
# one dial moved, seeds 1 and 2 of the reference world, then the costlier or less informative jobs.
JOBS: list[tuple[str, int, list[tuple[float, float]]]] = [
    ("reference", 0, FULL_GRID),
    ("class_cue", 0, CORE_CELLS),
    ("noisy_pretrain", 0, CORE_CELLS),
    ("short_pretrain", 0, CORE_CELLS),
    ("reference", 1, CORE_CELLS),
    ("reference", 2, CORE_CELLS),
    ("sparse_clutter", 0, CORE_CELLS),
    ("grid8", 0, CORE_CELLS),
    ("long_pretrain", 0, CORE_CELLS),
    ("grid8_sparse", 0, CORE_CELLS),
    *((world, seed, CORE_CELLS) for seed in (1, 2) for world in ("class_cue", "noisy_pretrain")),
    ("grid8_noisy", 0, CORE_CELLS),
    *((world, seed, CORE_CELLS) for seed in (1, 2) for world in ("short_pretrain", "long_pretrain", "grid8")),
]


def _job_key(world: str, seed: int) -> str:
    return f"{world}/seed{seed}"


def _run_in_worker(world: str, config, seed: int, cells, spec: StudySpec) -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_job(world, config, seed, cells, spec)


def run_jobs(jobs, worlds: dict, spec: StudySpec, log_path: str, workers: int) -> None:
    """Run every job of `jobs` not yet in the JSON-lines log at `log_path`, appending each as it finishes."""
    done = set()
    if os.path.exists(log_path):
        with open(log_path, encoding="utf-8") as f:
            done = {_job_key(entry["world"], entry["seed"]) for entry in map(json.loads, f) if entry}
    todo = [job for job in jobs if _job_key(job[0], job[1]) not in done]
    if workers <= 1:
        for world, seed, cells in todo:
            _append(log_path, run_job(world, worlds[world], seed, cells, spec))
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_in_worker, world, worlds[world], seed, cells, spec) for world, seed, cells in todo]
        for future in futures:
            _append(log_path, future.result())


def _append(log_path: str, entry: dict[str, Any]) -> None:
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"{_job_key(entry['world'], entry['seed'])}: {entry['seconds']:.0f} s", flush=True)


def collapse_warned_at(job: dict[str, Any], run: dict[str, Any]) -> int | None:
    """First monitored step whose embedding spread fell below the monitor's collapse ratio times the base's (what
    the issue-19 collapse warning would have flagged), or None."""
    limit = MonitorSettings().collapse_ratio * job["base_monitor"]["embedding_spread"]
    return next((point["step"] for point in run["guard_trace"] if point["embedding_spread"] < limit), None)


def run_rows(job: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per AFT fine-tuning of `job`: the base, the two controls and AFT at that (learning rate, ε)."""
    clean = next(run for run in job["runs"] if run["variant"] == "clean")
    rows = []
    for aft in (run for run in job["runs"] if run["variant"] == "aft"):
        key = (aft["learning_rate"], aft["eps"])
        random = next(r for r in job["runs"] if r["variant"] == "random" and (r["learning_rate"], r["eps"]) == key)
        base = job["base"][str(aft["eps"])]
        epg = "energy_pointing_game"
        rows.append(
            {
                "world": job["world"],
                "seed": job["seed"],
                "learning_rate": aft["learning_rate"],
                "eps": aft["eps"],
                "base_epg": base[epg],
                "base_attack_cosine": base["attack_cosine"],
                "base_robust_accuracy": base["robust_accuracy"],
                "base_accuracy": base["accuracy"],
                "base_spread": base["embedding_spread"],
                "clean_epg": clean["metrics"][epg],
                "random_epg": random["metrics"][epg],
                "aft_epg": aft["metrics"][epg],
                "delta_epg": aft["metrics"][epg] - clean["metrics"][epg],
                "delta_epg_random": random["metrics"][epg] - clean["metrics"][epg],
                "aft_accuracy": aft["metrics"]["accuracy"],
                "aft_robust_accuracy": aft["metrics"]["robust_accuracy"],
                "aft_spread": aft["metrics"]["embedding_spread"],
                "guard_fired_at": aft["guard"]["fired_at"],
                "guard_best_step": aft["guard"]["best_step"],
                "collapse_warned_at": collapse_warned_at(job, aft),
                "random_guard_fired_at": random["guard"]["fired_at"],
                "clean_guard_fired_at": clean["guard"]["fired_at"],
                "clean_is_base": job["clean_is_base"],
            }
        )
    return rows


def verdict(delta: float) -> str:
    """``helps`` / ``neutral`` / ``hurts`` for a mean ΔEPG, with :data:`NEUTRAL_BAND` as the neutral zone."""
    return "helps" if delta > NEUTRAL_BAND else "hurts" if delta < -NEUTRAL_BAND else "neutral"


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (world, learning rate, ε): means over the seeds run, per-seed ΔEPG and the guard's actions."""
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["world"], row["learning_rate"], row["eps"]), []).append(row)
    out = []
    for (world, lr, eps), group in cells.items():
        mean = {
            name: float(np.mean([r[name] for r in group]))
            for name in (
                "base_epg",
                "base_attack_cosine",
                "base_accuracy",
                "base_spread",
                "aft_epg",
                "delta_epg",
                "delta_epg_random",
                "aft_accuracy",
                "aft_robust_accuracy",
                "aft_spread",
            )
        }
        out.append(
            {
                "world": world,
                "learning_rate": lr,
                "eps": eps,
                "seeds": [r["seed"] for r in group],
                **mean,
                "delta_epg_per_seed": [r["delta_epg"] for r in group],
                "guard_fired_at_per_seed": [r["guard_fired_at"] for r in group],
                "guard_best_step_per_seed": [r["guard_best_step"] for r in group],
                "collapse_warned_at_per_seed": [r["collapse_warned_at"] for r in group],
                "verdict": verdict(mean["delta_epg"]),
            }
        )
    return out


def _guard_text(fired: list, best: list) -> str:
    return ", ".join(("silent" if f is None else f"fires@{f}") + f" (best@{b})" for f, b in zip(fired, best))


def table_markdown(summary: list[dict[str, Any]]) -> str:
    """The summary as a markdown table (one row per cell)."""
    header = [
        "world",
        "lr",
        "ε",
        "seeds",
        "base EPG",
        "base cos under attack",
        "base acc",
        "AFT EPG",
        "ΔEPG (AFT − clean)",
        "ΔEPG per seed",
        "random − clean",
        "AFT acc",
        "spread base → AFT",
        "verdict",
        "guard (AFT)",
        "collapse warning (AFT)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summary:
        cells = [
            s["world"],
            f"{s['learning_rate']:g}",
            f"{s['eps']:g}",
            ",".join(map(str, s["seeds"])),
            f"{s['base_epg']:.3f}",
            f"{s['base_attack_cosine']:.3f}",
            f"{s['base_accuracy']:.3f}",
            f"{s['aft_epg']:.3f}",
            f"**{s['delta_epg']:+.3f}**",
            " ".join(f"{d:+.3f}" for d in s["delta_epg_per_seed"]),
            f"{s['delta_epg_random']:+.3f}",
            f"{s['aft_accuracy']:.3f}",
            f"{s['base_spread']:.3f} → {s['aft_spread']:.3f}",
            s["verdict"],
            _guard_text(s["guard_fired_at_per_seed"], s["guard_best_step_per_seed"]),
            ", ".join("none" if step is None else f"@{step}" for step in s["collapse_warned_at_per_seed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_figure(rows: list[dict[str, Any]], path: str) -> None:
    """ΔEPG (AFT − clean) of every run against the base's EPG and against its cosine under attack (at the run's ε)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(LEARNING_RATES, ("tab:green", "tab:blue", "tab:red")))
    markers = dict(zip(EPSILONS, ("o", "s", "^")))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, x, label in zip(
        axes,
        ("base_epg", "base_attack_cosine"),
        ("base energy pointing game", "base cosine to itself under attack (ε of the run)"),
    ):
        ax.axhspan(-NEUTRAL_BAND, NEUTRAL_BAND, color="0.9", zorder=0)
        ax.axhline(0, color="0.5", lw=0.8)
        for row in rows:
            fired = row["guard_fired_at"] is not None
            ax.scatter(
                row[x],
                row["delta_epg"],
                c=colours[row["learning_rate"]],
                marker=markers[row["eps"]],
                s=36,
                edgecolors="black" if fired else "none",
                linewidths=1.2,
            )
        ax.set_xlabel(label)
    axes[0].set_ylabel("ΔEPG = AFT − clean control")
    handles = [plt.Line2D([], [], ls="", marker="o", color=c, label=f"lr {lr:g}") for lr, c in colours.items()]
    handles += [plt.Line2D([], [], ls="", marker=m, color="0.3", label=f"ε {e:g}/255") for e, m in markers.items()]
    if any(row["guard_fired_at"] is not None for row in rows):  # the legend names only what is plotted
        handles.append(plt.Line2D([], [], ls="", marker="o", mfc="white", mec="black", label="guard fired (outline)"))
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(f"When does AFT help? Each point one (world, seed, lr, ε); grey band: |ΔEPG| ≤ {NEUTRAL_BAND}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="Folder for jobs.jsonl, results.json, table.md, the figure.")
    parser.add_argument("--workers", type=int, default=2, help="Jobs run in parallel processes (one per core).")
    parser.add_argument("--first", type=int, default=len(JOBS), help="Run only the first N jobs of JOBS.")
    parser.add_argument("--report_only", action="store_true", help="Only rewrite the results from jobs.jsonl.")
    parser.add_argument("--no_figure", action="store_true", help="Skip the figure (needs matplotlib).")
    parser.add_argument("--smoke", action="store_true", help="One toy world, seconds: checks the pipeline only.")
    args = parser.parse_args(argv)
    if args.smoke:
        worlds, spec, jobs = {"smoke": SMOKE_WORLD}, SMOKE_SPEC, [("smoke", 0, [(1e-3, 8.0), (1e-4, 4.0)])]
    else:
        worlds, spec, jobs = WORLDS, StudySpec(), JOBS[: args.first]
    os.makedirs(args.output, exist_ok=True)
    log_path = os.path.join(args.output, "jobs.jsonl")
    start = time.perf_counter()
    if not args.report_only:
        run_jobs(jobs, worlds, spec, log_path, args.workers)
    with open(log_path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    rows = [row for entry in entries for row in run_rows(entry)]
    summary = summarise(rows)
    report = {
        "command": "python experiments/when_aft_helps/run_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "worlds": {
            name: {"dials": WORLD_DIALS.get(name, "smoke"), "config": worlds[name].to_dict()} for name in worlds
        },
        "study_spec": {k: v for k, v in vars(spec).items() if k != "finetune"} | {"finetune": vars(spec.finetune)},
        "neutral_band": NEUTRAL_BAND,
        "jobs_seconds": {_job_key(e["world"], e["seed"]): e["seconds"] for e in entries},
        "rows": rows,
        "summary": summary,
        "jobs": entries,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "workers": args.workers},
        "seconds_this_call": time.perf_counter() - start,
    }
    write_text_atomic(os.path.join(args.output, "results.json"), json.dumps(report, indent=1) + "\n")
    write_text_atomic(os.path.join(args.output, "table.md"), table_markdown(summary))
    if not args.no_figure:
        write_figure(rows, os.path.join(args.output, FIGURE_NAME))
    print(table_markdown(summary))
    return report


if __name__ == "__main__":
    main()
