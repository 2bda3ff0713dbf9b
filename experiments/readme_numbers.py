"""Every experiment and benchmark number that README.md and docs/*.md quote, computed from its results file.

    python -m experiments.readme_numbers        # (or python experiments/readme_numbers.py) each claim, its source

A claim is the exact text a page quotes (numbers with a few words around them, so that a number is checked where it
is used), the results file it comes from and the fields it is computed from. ``tests/test_readme_numbers.py``
checks that each claim's text appears in each of its pages: :data:`DOCS` (README.md or any docs/*.md page, whichever
holds it) and/or an experiment's or the benchmarks' RESULTS.md. When a rerun changes a results file, the test names
the claims whose text the pages must now quote. Pages are compared after :func:`normalise`: line breaks, bold
markers and block-quote markers do not count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from hf_clip_aft.files import read_json
from hf_clip_aft.interpret.dissect import load_dissection, summary_table

REPO = Path(__file__).resolve().parents[1]
LAPTOP = "experiments/laptop_scale/results/results.json"
MONITOR = "experiments/laptop_scale/results_monitor/results.json"
WHEN = "experiments/when_aft_helps/results/results.json"
LLAVA = "experiments/llava_maps/results/results.json"
DISSECTION = "experiments/dissection/results/results.json"
DISSECTION_DEMO = "experiments/dissection/demo/results.json"
CHEAPER = "experiments/cheaper_aft/results/summary.json"
LAPTOP_MD, WHEN_MD = "experiments/laptop_scale/RESULTS.md", "experiments/when_aft_helps/RESULTS.md"
DISSECTION_MD, CHEAPER_MD = "experiments/dissection/RESULTS.md", "experiments/cheaper_aft/RESULTS.md"
# benchmarks/aft_step.py's ViT-B/16 runs: the quiet library/naive run, bf16, activation checkpointing, the run under
# load, the attack schedules.
STEP_FP32 = "benchmarks/results/vit-b-16-fp32-repeat.json"
STEP_FP32_LOADED = "benchmarks/results/vit-b-16-fp32.json"
STEP_BF16 = "benchmarks/results/vit-b-16-bf16-repeat.json"
STEP_CHECKPOINTING = "benchmarks/results/vit-b-16-fp32-ckpt.json"
SCHEDULES = "benchmarks/results/schedules_vit-b-16.json"
DISSECT_COST = "benchmarks/results/dissect-cost.json"
DEFAULT_COMMAND = "benchmarks/results/default-command.json"
MONITOR_COST = "benchmarks/results/monitor-cost-vit-b-16.json"
COLLAPSE = "experiments/when_aft_helps/results_collapse/results.json"
COLLAPSE_WORLD = "grid8_64px_cold_long"
BENCHMARKS_MD = "benchmarks/RESULTS.md"
# The paper's run: 2 epochs of ImageNet-1k's training set (images).
PAPER_IMAGES = 2 * 1_281_167
# benchmarks/demo_timings.py: the README's offline demos, run as written in a fresh clone; the pages quoting each.
DEMO_TIMINGS = "benchmarks/results/demo_timings.json"
DEMO_PAGES = {
    "train": ("README.md",),
    "monitor": ("README.md", "docs/monitor.md"),
    "evaluate": ("README.md", "docs/evaluation.md"),
    "dissect": ("README.md", "docs/dissection.md"),
    "llava_explain": ("docs/llava.md",),
}

# The dissection demo table's rows: CLIP-Dissect's headline numbers.
DEMO_KEYS = ("labelled_fraction", "unique_concepts", "mean_best_similarity")
# when_aft_helps: a base "learnt the task" when its zero-shot accuracy is at least twice chance (6 classes), the
# rule the laptop search used for AFT towers; the study's one base below it sits at chance.
LEARNT_ACCURACY = 2 / 6
# The pages a claim may name: DOCS is README.md or any docs/*.md page.
DOCS = "README.md or docs/*.md"
NUMBER_WORDS = dict(enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")))


@dataclass(frozen=True)
class Claim:
    """`text`, as a page quotes it; `source`, the results file (relative to the repository root); `field`, the
    fields it is computed from; `pages`, where it must appear (:data:`DOCS`, or a page's path from the root)."""

    text: str
    source: str
    field: str
    pages: tuple[str, ...] = (DOCS,)


def normalise(text: str) -> str:
    """`text` without block-quote markers and bold markers, every run of white space one space."""
    text = re.sub(r"^>[ \t]?", "", text, flags=re.MULTILINE).replace("**", "")
    return " ".join(text.split())


def results_file(relative: str) -> Any:
    """The JSON object in the results file `relative` (a path from the repository root)."""

    def is_document(document: Any) -> None:
        if not isinstance(document, dict):
            raise ValueError(f"{relative} holds {type(document).__name__}, not a JSON object: rerun its experiment.")

    return read_json(REPO / relative, is_document)


def _pm(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def laptop_scale_claims() -> list[Claim]:
    """The three-seed laptop run (base, clean, random, AFT; Simple Gradient, CLIP Surgery, NACLIP)."""
    report = results_file(LAPTOP)
    summary = report["summary"]
    epg = "energy_pointing_game"
    methods = {"Simple Gradient": epg, "CLIP Surgery": f"{epg}@clip_surgery", "NACLIP": f"{epg}@naclip"}
    table = ["| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    table += [
        f"| {label} | " + " | ".join(_pm(summary[model][key]) for key in methods.values()) + " |"
        for model, label in (("base", "base"), ("aft", "AFT"))
    ]
    gains = {name: summary["aft"][key]["mean"] - summary["base"][key]["mean"] for name, key in methods.items()}
    per_seed = [
        seed["metrics"]["aft"][key] - seed["metrics"]["base"][key]
        for seed in report["seeds"]
        for key in methods.values()
    ]
    every_seed = "positive on every seed" if min(per_seed) > 0 else "not positive on every seed"
    controls = max(
        abs(seed["metrics"][control][key] - seed["metrics"]["base"][key])
        for seed in report["seeds"]
        for control in ("clean", "random")
        for key in methods.values()
    )
    over_controls = min(summary["aft"][epg]["mean"] - summary[c][epg]["mean"] for c in ("clean", "random"))
    accuracy = f"{summary['base']['accuracy']['mean']:.3f} → {summary['aft']['accuracy']['mean']:.3f}"
    return [
        Claim(f"by about {over_controls:+.2f} over both controls", LAPTOP, f"summary.aft − summary.clean/random {epg}"),
        Claim(
            f"from {_pm(summary['base'][epg])} to {_pm(summary['aft'][epg])}",
            LAPTOP,
            f"summary.base/aft.{epg}",
            (DOCS, LAPTOP_MD),
        ),
        Claim(accuracy, LAPTOP, "summary.base/aft.accuracy.mean", (DOCS, LAPTOP_MD)),
        Claim("\n".join(table), LAPTOP, "summary.base/aft.energy_pointing_game[@clip_surgery, @naclip]"),
        Claim(
            f"{gains['CLIP Surgery']:+.3f} and {gains['NACLIP']:+.3f} against {gains['Simple Gradient']:+.3f}, "
            + every_seed,
            LAPTOP,
            "summary.aft − summary.base, energy_pointing_game@clip_surgery, @naclip, plain; seeds[*].metrics",
        ),
        Claim(f"within {controls:.3f} of the base with every map", LAPTOP, "seeds[*].metrics.clean/random − base"),
        Claim(f"took {report['seconds_total']:.0f} s wall clock", LAPTOP, "seconds_total"),
        Claim(documented_command(report["command"], "experiments/laptop_scale/results"), LAPTOP, "command"),
    ]


def documented_command(command: str, output: str) -> str:
    """`command` as the pages show it: writing into the repository's results folder `output` instead of the
    scratch folder the run used."""
    return re.sub(r"--output \S+", f"--output {output}", command)


def monitor_claims() -> list[Claim]:
    """The laptop AFT re-run with the map monitor: its verdicts, its stops, its test numbers against the full run."""
    report, full = results_file(MONITOR), results_file(LAPTOP)
    evaluations = [seed["training_evaluations"]["aft"] for seed in report["seeds"]]
    epg = "energy_pointing_game"
    pairs = ", ".join(f"{e['base'][epg]:.4f} → {e['exported'][epg]:.4f}" for e in evaluations)
    first_warnings = sorted({int(re.match(r"Step (\d+):", e["warnings"][0]).group(1)) for e in evaluations})
    stops = [str(e["final_step"]) for e in evaluations]
    summary, full_summary = report["summary"]["aft"], full["summary"]["aft"]
    return [
        Claim(f"({pairs})", MONITOR, "seeds[*].training_evaluations.aft.base/exported.energy_pointing_game"),
        Claim(
            f"warn from step {' or '.join(map(str, first_warnings))}",
            MONITOR,
            "seeds[*].training_evaluations.aft.warnings[0]",
        ),
        Claim(
            f"at step {', '.join(stops[:-1])} and {stops[-1]} of {report['config']['finetune']['steps']}",
            MONITOR,
            "seeds[*].training_evaluations.aft.final_step; config.finetune.steps",
            (DOCS, LAPTOP_MD),
        ),
        Claim(
            f"({_pm(summary[epg])} vs {_pm(full_summary[epg])})",
            f"{MONITOR}, {LAPTOP}",
            f"summary.aft.{epg} of each",
        ),
        Claim(
            f"({summary['accuracy']['mean']:.3f} vs {full_summary['accuracy']['mean']:.3f})",
            f"{MONITOR}, {LAPTOP}",
            "summary.aft.accuracy.mean of each",
        ),
        Claim(evaluations[0]["verdict"], MONITOR, "seeds[0].training_evaluations.aft.verdict", (LAPTOP_MD,)),
    ]


def when_aft_helps_claims() -> list[Claim]:
    """The study over synthetic worlds: the bases that learnt the task, and AFT's gain over the clean control."""
    report = results_file(WHEN)
    rows = [row for row in report["rows"] if row["base_accuracy"] >= LEARNT_ACCURACY]
    bases = [row["base_epg"] for row in rows]
    gains = [row["delta_epg"] for row in rows if row["learning_rate"] == 1e-3]
    worlds = len({job["world"] for job in report["jobs"]})
    learnt = f"rows with base_accuracy ≥ {LEARNT_ACCURACY:.3f}"
    return [
        Claim(f"{NUMBER_WORDS[worlds]} synthetic worlds", WHEN, "jobs[*].world (distinct)"),
        Claim(
            f"base energy pointing game {min(bases):.2f}–{max(bases):.2f}", WHEN, f"{learnt}: base_epg", (DOCS, WHEN_MD)
        ),
        Claim(f"{min(gains):+.2f} to {max(gains):+.2f} at lr 1e-3", WHEN, f"{learnt}, learning_rate 1e-3: delta_epg"),
        Claim(f"{min(gains):+.3f} to {max(gains):+.3f}", WHEN, f"{learnt}, learning_rate 1e-3: delta_epg", (WHEN_MD,)),
        Claim(f"within {report['study_spec']['finetune']['steps']} steps", WHEN, "study_spec.finetune.steps"),
    ]


def llava_maps_claims() -> list[Claim]:
    """The tiny LLaVA on the laptop towers: the answer token's attention maps and the answers' accuracy."""
    summary = results_file(LLAVA)["summary"]
    epg = "energy_pointing_game"
    trained, own = summary["trained"], summary["own"]
    uniform = results_file(LLAVA)["mask_share"]
    return [
        Claim(
            f"{trained['base']['maps']['attention'][epg]:.3f} with the base tower and "
            f"{trained['aft']['maps']['attention'][epg]:.3f} with the AFT tower (uniform map: {uniform:.3f})",
            LLAVA,
            f"summary.trained.base/aft.maps.attention.{epg}; mask_share",
        ),
        Claim(
            f"its attention scores {own['aft']['maps']['attention'][epg]:.3f} and it answers "
            f"{own['aft']['accuracy']:.2f} correctly (base: {trained['base']['accuracy']:.2f})",
            LLAVA,
            f"summary.own.aft.maps.attention.{epg}; summary.own.aft.accuracy; summary.trained.base.accuracy",
        ),
    ]


def dissection_demo_table(path: str | Path = REPO / DISSECTION_DEMO) -> str:
    """The markdown table of the dissection demo: CLIP-Dissect's headline numbers per layer and model, with Δ."""
    return "\n".join(summary_table(load_dissection(path), DEMO_KEYS)) + "\n"


def dissection_claims() -> list[Claim]:
    """The offline dissection demo's table, and the laptop towers' Network Dissection IoU."""
    rows = [
        row
        for row in results_file(DISSECTION)["summary"]
        if row["method"] == "network_dissection" and row["unit_kind"] == "mlp"
    ]
    iou = {
        model: [row["mean_std"]["mean_best_iou"]["mean"] for row in rows if row["model"] == model]
        for model in ("base", "aft")
    }
    span = " → ".join(f"{min(values):.3f}–{max(values):.3f}" for values in iou.values())
    return [
        Claim(dissection_demo_table(), DISSECTION_DEMO, f"clip_dissect {', '.join(DEMO_KEYS)} per layer and model"),
        Claim(
            span,
            DISSECTION,
            "summary[network_dissection, mlp, base/aft].mean_std.mean_best_iou.mean over blocks",
            (DOCS, DISSECTION_MD),
        ),
    ]


def cheaper_aft_claims() -> list[Claim]:
    """The attack schedules' gains over the clean control (both worlds) and their attack cost against K = 10 PGD."""
    summary = results_file(CHEAPER)["summary"]
    worlds = ("laptop", "when_aft_helps_reference")

    def gain(world: str, variant: str) -> str:
        stat = summary[world]["variants"][variant]["gain"]
        return f"+{stat['mean']:.3f} ± {stat['std']:.3f}"

    def share(variant: str) -> Fraction:
        return Fraction(summary["laptop"]["variants"][variant]["cost_share_of_pgd10"]).limit_denominator(100)

    field = "summary.<world>.variants.{free4,pgd10}.gain"
    claims = [Claim(f"{gain(w, 'free4')} vs {gain(w, 'pgd10')}", CHEAPER, field.replace("<world>", w)) for w in worlds]
    claims += [
        Claim(
            f"{gain(w, 'free4')} against {gain(w, 'pgd10')}",
            CHEAPER,
            field.replace("<world>", w),
            (CHEAPER_MD,),
        )
        for w in worlds
    ]
    return [
        *claims,
        Claim(
            f"({gain(worlds[0], 'fgsm_rs')} and {gain(worlds[1], 'fgsm_rs')})",
            CHEAPER,
            "summary.<world>.variants.fgsm_rs.gain",
        ),
        Claim(f"{share('free4')} of K = 10 PGD's FLOPs", CHEAPER, "summary.laptop.variants.free4.cost_share_of_pgd10"),
        Claim(f"({share('fgsm_rs')} of the FLOPs)", CHEAPER, "summary.laptop.variants.fgsm_rs.cost_share_of_pgd10"),
    ]


def step_row(relative: str, **setting: Any) -> dict[str, Any]:
    """The one row of the benchmark file `relative` whose setting has the given values."""
    rows = [row for row in results_file(relative)["results"] if setting.items() <= row["setting"].items()]
    if len(rows) != 1:
        raise ValueError(f"{relative} has {len(rows)} rows with setting {setting}, not one: rerun its benchmark.")
    return rows[0]


def aft_step_claims() -> list[Claim]:
    """ViT-B/16, batch 4, K = 10 (benchmarks/aft_step.py): the step's FLOPs, the paper run's, library vs naive."""
    library, naive = step_row(STEP_FP32, path="library"), step_row(STEP_FP32, path="naive")
    precompute, bf16 = step_row(STEP_FP32, path="library-precompute"), step_row(STEP_BF16, path="library")
    checkpointing = step_row(STEP_CHECKPOINTING, path="library", activation_checkpointing=True)
    plain = [library["step_s"], step_row(STEP_FP32_LOADED, path="library")["step_s"]]
    setting = library["setting"]
    equivalents, forward = library["forward_equivalents_per_image"], library["forward_gflop_per_image"]
    gflop = library["step_gflop"] / setting["batch_size"]
    fe = "results[library].forward_equivalents_per_image"
    return [
        Claim(
            f"2K + {equivalents - 2 * setting['attack_steps']:.1f} forward-equivalents",
            STEP_FP32,
            f"{fe} − 2 setting.attack_steps",
        ),
        Claim(
            f"{equivalents:.1f} × {forward:.1f} GFLOP ≈ {gflop:.0f} GFLOP per image",
            STEP_FP32,
            f"{fe}; forward_gflop_per_image; step_gflop / setting.batch_size",
        ),
        Claim(
            f"({PAPER_IMAGES / 1e6:.2f} M images) are about {gflop * 1e9 * PAPER_IMAGES / 1e18:.1f}e18 FLOP",
            STEP_FP32,
            "results[library].step_gflop / setting.batch_size × 2 epochs × 1,281,167 images",
        ),
        Claim(
            f"{equivalents:.2f} × {forward / 2:.2f} = {gflop / 2:.0f} GMAC ≈ {gflop:.0f} GFLOP per image",
            STEP_FP32,
            f"{fe}; forward_gflop_per_image / 2; step_gflop / setting.batch_size",
            (BENCHMARKS_MD,),
        ),
        Claim(
            f"{naive['step_s'] / library['step_s']:.2f}× the naive speed "
            f"({naive['step_s'] / precompute['step_s']:.2f}× with `precompute_ref_embeddings: true`)",
            STEP_FP32,
            "results[naive].step_s / results[library, library-precompute].step_s",
        ),
        Claim(
            f"({library['step_peak_mib']:.0f} vs {naive['step_peak_mib']:.0f} MiB)",
            STEP_FP32,
            "results[library, naive].step_peak_mib",
        ),
        Claim(
            f"`bf16: true` is {naive['step_s'] / bf16['step_s']:.2f}× the naive fp32 step",
            f"{STEP_FP32}, {STEP_BF16}",
            "results[naive].step_s / results[library, bf16].step_s",
        ),
        *(
            Claim(
                f"{row['step_s'] / naive['step_s']:.3f} ({naive['step_s'] / row['step_s']:.2f}×)",
                source,
                f"results[{name}].step_s / results[naive].step_s",
                (BENCHMARKS_MD,),
            )
            for name, row, source in (
                ("library", library, STEP_FP32),
                ("library-precompute", precompute, STEP_FP32),
                ("library, bf16", bf16, f"{STEP_FP32}, {STEP_BF16}"),
            )
        ),
        Claim(
            f"{checkpointing['step_s'] / max(plain) - 1:+.0%} to {checkpointing['step_s'] / min(plain) - 1:+.0%} "
            f"time for {1 - checkpointing['step_peak_mib'] / library['step_peak_mib']:.0%} less step memory",
            f"{STEP_CHECKPOINTING}, {STEP_FP32}, {STEP_FP32_LOADED}",
            "results[activation_checkpointing].step_s / results[library].step_s of both fp32 runs; step_peak_mib",
        ),
        Claim(
            f"against {equivalents:.1f} per training image",
            STEP_FP32,
            fe,
        ),
    ]


def schedule_claims() -> list[Claim]:
    """The attack schedules' forward-equivalents per image-step (ViT-B/16, FlopCounterMode): docs/performance.md's
    table."""

    def equivalents(schedule: str) -> str:
        return f"{step_row(SCHEDULES, schedule=schedule)['forward_equivalents_per_image']:.2f}"

    field = "results[schedule={}].forward_equivalents_per_image"
    pgd_steps = step_row(SCHEDULES, schedule="pgd")["setting"]["attack_steps"]
    carry_steps = step_row(SCHEDULES, schedule="carry")["setting"]["attack_steps"]
    return [
        Claim(f"| {equivalents('pgd')} at K = {pgd_steps} |", SCHEDULES, field.format("pgd")),
        Claim(f"| {equivalents('pgd_early_stop')} on a random tower;", SCHEDULES, field.format("pgd_early_stop")),
        Claim(f"| Wong et al. 2020 | {equivalents('fgsm_rs')} |", SCHEDULES, field.format("fgsm_rs")),
        Claim(f"| {equivalents('free')} per optimiser step |", SCHEDULES, field.format("free")),
        Claim(f"({equivalents('carry')} at K = {carry_steps})", SCHEDULES, field.format("carry")),
    ]


def dissect_cost_claims() -> list[Claim]:
    """Network Dissection's peak memory over the probe set sizes (benchmarks/dissect_cost.py)."""
    rows = [row for row in results_file(DISSECT_COST)["rows"] if row["stage"] == "network_dissection"]
    peaks, images = [row["peak_rss_mib"] for row in rows], [row["images"] for row in rows]
    return [
        Claim(
            f"{min(peaks):.0f}–{max(peaks):.0f} MiB from {min(images)} to {max(images):,} images",
            DISSECT_COST,
            "rows[stage=network_dissection].peak_rss_mib, .images",
        )
    ]


def collapse_world_claims() -> list[Claim]:
    """The bunched-embedding base of when_aft_helps' collapse_world, three seeds, with the monitor's current rules
    (run ``aft_best``: no stop, the best non-collapsed checkpoint by energy pointing game, the base competing)."""
    jobs = results_file(COLLAPSE)["jobs"]
    runs = [jobs[f"{COLLAPSE_WORLD}/seed{seed}/full"] for seed in range(3)]
    evaluations = [job["runs"]["aft_best"]["training_evaluation"] for job in runs]
    collapsed = {tuple(e["collapsed_steps"]) for e in evaluations}
    if len(collapsed) != 1:
        raise ValueError(f"{COLLAPSE}: the seeds collapsed at different steps {sorted(collapsed)}; reword the pages.")
    (steps,) = collapsed
    after = min(h["step"] for e in evaluations for h in e["history"] if h["step"] > steps[-1])

    def per_seed(values: list[float]) -> str:
        return "/".join(f"{value:.3f}" for value in values)

    def test_metric(name: str) -> str:
        base = per_seed([job["base"][name] for job in runs])
        return f"{base} → {per_seed([job['runs']['aft_best']['metrics'][name] for job in runs])}"

    field = f"jobs[{COLLAPSE_WORLD}/seed0-2/full]"
    return [
        Claim(
            f"collapsed at steps {' and '.join(map(str, steps))} and was no longer collapsed from step {after}",
            COLLAPSE,
            f"{field}.runs.aft_best.training_evaluation.collapsed_steps, .history[*].step",
        ),
        Claim(
            "exported steps "
            + ", ".join(str(e["exported_step"]) for e in evaluations[:-1])
            + f" and {evaluations[-1]['exported_step']}",
            COLLAPSE,
            f"{field}.runs.aft_best.training_evaluation.exported_step",
        ),
        Claim(
            f"energy pointing game {test_metric('energy_pointing_game')} and accuracy {test_metric('accuracy')}",
            COLLAPSE,
            f"{field}.base / .runs.aft_best.metrics: energy_pointing_game, accuracy",
        ),
    ]


def default_command_claims() -> list[Claim]:
    """`python benchmarks/aft_step.py` as it is (ViT-B/32, batch 2, K = 10, library and naive) on the CPU."""
    report = results_file(DEFAULT_COMMAND)
    library, naive = (step_row(DEFAULT_COMMAND, path=path) for path in ("library", "naive"))
    before, after = report["load_average"]
    return [
        Claim(
            f"took {library['step_s']:.2f} s (library) and {naive['step_s']:.2f} s (naive) at load average "
            f"{before:.1f} to {after:.1f}",
            DEFAULT_COMMAND,
            "results[path=library/naive].step_s; load_average",
        )
    ]


def monitor_cost_claims() -> list[Claim]:
    """One map-monitor evaluation of ViT-B/16, with and without masks (benchmarks/monitor_cost.py)."""
    rows = {row["case"]: row["forward_equivalents_per_image"] for row in results_file(MONITOR_COST)["rows"]}
    return [
        Claim(
            f"costs {rows['masks']:.1f} forward-equivalents per held-out image with masks and {rows['no_masks']:.0f}"
            " without",
            MONITOR_COST,
            "rows[case=masks/no_masks].forward_equivalents_per_image",
        )
    ]


def duration(seconds: float) -> str:
    """`seconds` as a page writes a wall time: "17 s", "4 min 14 s"."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def demo_timing_claims() -> list[Claim]:
    """Each offline demo's wall time in its one timed run, with the CPU count and the range of the 1-minute load
    average read before and after it."""
    report = results_file(DEMO_TIMINGS)
    steps = {step["name"]: step for step in report["steps"]}
    claims = []
    for name, pages in DEMO_PAGES.items():
        step = steps[name]
        low, high = sorted((step["load_average_before"][0], step["load_average_after"][0]))
        claims.append(
            Claim(
                f"{duration(step['wall_seconds'])} in one run on {report['cpu_count']} CPU cores at load average "
                f"{low:.1f} to {high:.1f}",
                DEMO_TIMINGS,
                f"steps[{name}].wall_seconds, load_average_before/after[0]; cpu_count",
                pages,
            )
        )
    return claims


def claims() -> list[Claim]:
    """Every claim, experiment by experiment."""
    return [
        *laptop_scale_claims(),
        *monitor_claims(),
        *when_aft_helps_claims(),
        *llava_maps_claims(),
        *dissection_claims(),
        *cheaper_aft_claims(),
        *aft_step_claims(),
        *schedule_claims(),
        *dissect_cost_claims(),
        *default_command_claims(),
        *monitor_cost_claims(),
        *collapse_world_claims(),
        *demo_timing_claims(),
    ]


def pages(root: Path = REPO) -> dict[str, str]:
    """README.md and every docs/*.md page, normalised: the pages a claim may live in."""
    paths = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    return {str(path.relative_to(root)): normalise(path.read_text(encoding="utf-8")) for path in paths}


def missing(claim: Claim, found: dict[str, str], root: Path = REPO) -> list[str]:
    """The pages of `claim` that do not quote its text (`found`: :func:`pages`)."""
    text = normalise(claim.text)
    gaps = [] if DOCS not in claim.pages or any(text in page for page in found.values()) else [DOCS]
    for page in claim.pages:
        if page != DOCS and text not in normalise((root / page).read_text(encoding="utf-8")):
            gaps.append(page)
    return gaps


def main() -> None:
    """Print every claim: its source file and fields, the pages that quote it, and the pages that should but do not."""
    found = pages()
    for claim in claims():
        text = normalise(claim.text)
        quoted = [name for name, page in found.items() if text in page]
        quoted += [page for page in claim.pages if page != DOCS and text in normalise((REPO / page).read_text("utf-8"))]
        gaps = missing(claim, found)
        print(f"{claim.source} [{claim.field}]")
        print(
            f"    quoted in: {', '.join(quoted) or 'nowhere'}" + (f"; MISSING from: {', '.join(gaps)}" if gaps else "")
        )
        print("    " + claim.text.rstrip("\n").replace("\n", "\n    "))


if __name__ == "__main__":
    main()
