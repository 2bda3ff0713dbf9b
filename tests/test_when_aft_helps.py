"""The when-does-AFT-help study (experiments/when_aft_helps): one toy job end to end, the guard's replay, the table."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

from hf_clip_aft.interpret.monitor import MapGuard

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "when_aft_helps"
sys.path.insert(0, str(EXPERIMENT))

study = importlib.import_module("study")
run = importlib.import_module("run_study")


def test_guard_summary_replays_the_guard_and_picks_the_best_evaluation():
    base = {"energy_pointing_game": 0.50}
    guard = MapGuard("energy_pointing_game", True, tolerance=0.02, patience=2)
    values = [(8, 0.49), (16, 0.47), (24, 0.45), (30, 0.52)]  # within tolerance, worse, worse (fires), better
    trace = [{"step": step, "energy_pointing_game": v, "guard_fired": guard.update(0.50, v)} for step, v in values]
    assert study.guard_summary(base, trace, "energy_pointing_game") == {
        "fired_at": 24,
        "best_step": 30,
        "best_value": 0.52,
    }
    silent = [{"step": 8, "energy_pointing_game": 0.40, "guard_fired": False}]
    assert study.guard_summary(base, silent, "energy_pointing_game") == {
        "fired_at": None,
        "best_step": 0,
        "best_value": 0.50,
    }


def test_verdict_uses_the_neutral_band():
    assert [run.verdict(d) for d in (0.05, 0.01, -0.01, -0.05)] == ["helps", "neutral", "neutral", "hurts"]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toy_job_runs_controls_and_guard_and_reports_rows(one_thread):
    job = study.run_job("smoke", study.SMOKE_WORLD, 0, [(1e-3, 8.0)], study.SMOKE_SPEC)
    assert job["clean_is_base"]
    assert [(r["variant"], r["learning_rate"], r["eps"]) for r in job["runs"]] == [
        ("clean", 1e-3, 8.0),
        ("aft", 1e-3, 8.0),
        ("random", 1e-3, 8.0),
    ]
    for record in job["runs"]:
        assert [point["step"] for point in record["guard_trace"]] == list(study.SMOKE_SPEC.guard_points)
        assert 0 <= record["metrics"]["embedding_spread"] <= 2
    # The clean control is the base: same metrics, and the guard never fires on it.
    clean = job["runs"][0]
    assert clean["metrics"]["energy_pointing_game"] == job["base"]["8.0"]["energy_pointing_game"]
    assert clean["guard"]["fired_at"] is None
    (row,) = run.run_rows(job)
    assert row["delta_epg"] == pytest.approx(row["aft_epg"] - row["clean_epg"])
    assert 0 < row["base_attack_cosine"] <= 1
    (cell,) = run.summarise([row])
    assert cell["seeds"] == [0] and cell["verdict"] == run.verdict(row["delta_epg"])
    assert "| smoke | 0.001 | 8 | 0 |" in run.table_markdown([cell])
