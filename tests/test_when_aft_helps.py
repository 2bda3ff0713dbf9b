"""The when-does-AFT-help study (experiments/when_aft_helps): one toy job end to end, the guard's replay, the table."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from hf_clip_aft.interpret.monitor import MapGuard, MonitorSettings

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


collapse = importlib.import_module("collapse_world")


def test_bunching_of_planted_embeddings():
    same = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)
    assert collapse.bunching(same) == pytest.approx(
        {"mean_pairwise_cosine": 1.0, "cosine_to_mean_direction": 1.0, "constant_encoder_fare_loss": 0.0}, abs=1e-6
    )
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    numbers = collapse.bunching(opposite[:2])
    assert numbers["mean_pairwise_cosine"] == pytest.approx(-1.0)
    # Two orthogonal unit vectors: the mean direction is at 45° to each, so a constant encoder costs 2 − 2 cos 45°.
    numbers = collapse.bunching(torch.eye(2))
    assert numbers["cosine_to_mean_direction"] == pytest.approx(2**-0.5)
    assert numbers["constant_encoder_fare_loss"] == pytest.approx(2 - 2**0.5)


def test_collapse_world_smoke_writes_base_and_every_monitored_run(tmp_path, one_thread):
    first = collapse.main(["--smoke", "--output", str(tmp_path), "--variants", "aft_no_stop", "aft_monitored"])
    (job,) = first["jobs"].values()
    assert set(job["runs"]) == {"aft_no_stop", "aft_monitored"}
    assert 0 < job["mask_share"] < 1 and -1 <= job["base"]["mean_pairwise_cosine"] <= 1
    no_stop = job["runs"]["aft_no_stop"]
    assert (
        no_stop["steps_trained"] == collapse.SMOKE_FINETUNE.steps
        and no_stop["monitor_settings"]["stop_after_collapses"] == 0
        and no_stop["overrides"] == {}
    )
    assert job["runs"]["aft_monitored"]["monitor_settings"]["stop_after_collapses"] == 2
    (recorded,) = json.loads((tmp_path / "results.json").read_text())["jobs"].values()
    # The third run alone, merged into the recorded job: the other runs and the job's fields are kept.
    report = collapse.main(["--smoke", "--output", str(tmp_path), "--variants", "aft_best"])
    (merged,) = report["jobs"].values()
    assert set(merged["runs"]) == {"aft_no_stop", "aft_monitored", "aft_best"}
    assert merged["runs"]["aft_no_stop"] == recorded["runs"]["aft_no_stop"] and merged["command"] == job["command"]
    best = merged["runs"]["aft_best"]
    assert best["base_as_recorded"] and best["command"].endswith("--variants aft_best")
    assert best["monitor_settings"]["stop_after_collapses"] == MonitorSettings().stop_after_collapses
    assert best["overrides"]["load_best_model_at_end"] and best["overrides"]["save_strategy"] == "steps"
    evaluation = best["training_evaluation"]
    every = collapse.SMOKE_FINETUNE.monitor_steps
    assert [point["step"] for point in evaluation["history"]] == list(
        range(0, collapse.SMOKE_FINETUNE.steps + 1, every)
    )
    assert list(best["collapsed_by_step"]) == [str(point["step"]) for point in evaluation["history"]]
    # What the Trainer exported is a measured checkpoint or the base, and the weights say the same.
    assert str(evaluation["exported_step"]) in best["collapsed_by_step"]
    assert best["exported_is_base_weights"] == (evaluation["exported_step"] == 0) == evaluation["exported_is_base"]
    assert not best["collapsed_by_step"][str(evaluation["exported_step"])]
    for run in merged["runs"].values():
        evaluation = run["training_evaluation"]
        assert evaluation["verdict"].startswith("Map monitor verdict") and evaluation["history"][0]["step"] == 0
    table = collapse.table_markdown(report)
    assert "| smoke/seed0/full | base |" in table and "| smoke/seed0/full | aft_best |" in table
