"""Every experiment and benchmark number that README.md, docs/*.md and the RESULTS.md pages quote is its results
file's.

The claims (text, source file, fields) are computed by experiments/readme_numbers.py; `python -m
experiments.readme_numbers` prints them with the pages that quote them.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_numbers", REPO / "experiments" / "readme_numbers.py")
readme_numbers = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = readme_numbers  # its dataclass looks its module up there
spec.loader.exec_module(readme_numbers)

timings_spec = importlib.util.spec_from_file_location("demo_timings", REPO / "benchmarks" / "demo_timings.py")
demo_timings = importlib.util.module_from_spec(timings_spec)
sys.modules[timings_spec.name] = demo_timings
timings_spec.loader.exec_module(demo_timings)

CLAIMS = readme_numbers.claims()
PAGES = readme_numbers.pages()


@pytest.mark.parametrize("claim", CLAIMS, ids=[f"{c.source.split('/')[1]}:{c.text[:40]}" for c in CLAIMS])
def test_each_page_quotes_the_number_its_results_file_gives(claim):
    missing = readme_numbers.missing(claim, PAGES)
    assert not missing, f"{missing} should quote {claim.text!r} ({claim.source}: {claim.field})"


def test_every_experiment_is_covered_and_every_page_is_searched():
    sources = {claim.source for claim in CLAIMS}
    for path in (readme_numbers.LAPTOP, readme_numbers.WHEN, readme_numbers.LLAVA, readme_numbers.CHEAPER):
        assert path in sources
    assert any(readme_numbers.MONITOR in source for source in sources)
    assert {readme_numbers.DISSECTION, readme_numbers.DISSECTION_DEMO} <= sources
    benchmarks = (readme_numbers.STEP_FP32, readme_numbers.SCHEDULES, readme_numbers.DISSECT_COST)
    assert {*benchmarks, readme_numbers.DEMO_TIMINGS} <= sources
    assert "README.md" in PAGES and all(name.endswith(".md") for name in PAGES)


def test_the_dissection_demo_table_is_the_whole_table():
    table = readme_numbers.dissection_demo_table()
    assert table.count("\n") == 2 + 2 * len(readme_numbers.DEMO_KEYS)  # header, rule, two layers


def test_cheaper_aft_free4_meets_its_target_on_three_seeds_of_both_worlds():
    """What the pages say of the gains: free4 meets the target on both worlds, over seeds 0, 1, 2."""
    summary = readme_numbers.results_file(readme_numbers.CHEAPER)["summary"]
    for world in ("laptop", "when_aft_helps_reference"):
        assert summary[world]["variants"]["free4"]["meets_target"]
        assert summary[world]["seeds"] == [0, 1, 2]


def test_normalise_ignores_line_breaks_bold_and_quote_markers_only():
    page = "> the gain **0.372 ±\n> 0.018** here"
    assert "the gain 0.372 ± 0.018 here" in readme_numbers.normalise(page)
    assert "0.372 ± 0.019" not in readme_numbers.normalise(page)


@pytest.mark.parametrize("step", demo_timings.STEPS, ids=[step.name for step in demo_timings.STEPS])
def test_each_timed_demo_is_written_verbatim_on_a_page(step):
    """demo_timings.py times the commands as the pages write them: a command edited on its page fails here."""
    raw = [path.read_text(encoding="utf-8") for path in (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))]
    assert any(step.text in page for page in raw), f"no page writes the {step.name} step verbatim:\n{step.text}"


def test_the_timings_file_ran_every_demo_as_written_and_each_succeeded():
    report = readme_numbers.results_file(readme_numbers.DEMO_TIMINGS)
    ran = [(step["name"], step["language"], step["text"]) for step in report["steps"]]
    assert ran == [(step.name, step.language, step.text) for step in demo_timings.STEPS], (
        "a demo's command changed since benchmarks/results/demo_timings.json: rerun python benchmarks/demo_timings.py"
    )
    assert [step["name"] for step in report["steps"] if step["exit_code"]] == []
    assert set(readme_numbers.DEMO_PAGES) <= {step.name for step in demo_timings.STEPS}


def test_duration_is_written_in_seconds_or_minutes_and_seconds():
    assert readme_numbers.duration(17.3) == "17 s"
    assert readme_numbers.duration(254.0) == "4 min 14 s"
    assert readme_numbers.duration(59.6) == "1 min 0 s"
