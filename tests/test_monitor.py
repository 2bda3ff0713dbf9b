"""Interpretability during training: the monitor's numbers, the callback's steps, the base as a candidate, the
verdict, guard, collapse, and a best checkpoint that survives a SIGKILL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import (
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModelWithProjection,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

from hf_clip_aft import AFTConfig, AFTTrainer
from hf_clip_aft.interpret.monitor import (
    MapGuard,
    MapMonitor,
    MapMonitorCallback,
    MonitorSettings,
    embedding_spread,
    majority_share,
    verdict_text,
)
from hf_clip_aft.release.record import TrainingRecord
from planted_monitor_run import METRIC, TINY, masked_scenes, planted_run
from test_trainer import make_args as trainer_args


def test_spread_and_majority_share_known_answers():
    assert embedding_spread(torch.ones(5, 4)) == pytest.approx(0.0, abs=1e-12)
    assert embedding_spread(torch.eye(4)) == pytest.approx(1.0)
    pair = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert embedding_spread(pair) == pytest.approx(2.0)
    assert majority_share(torch.tensor([0, 0, 1, 2])) == 0.5
    with pytest.raises(ValueError, match="at least 2"):
        embedding_spread(torch.ones(1, 3))


def test_guard_fires_after_patience_and_resets():
    guard = MapGuard("energy_pointing_game", higher_is_better=True, tolerance=0.05, patience=2)
    assert not guard.update(0.5, 0.44)  # first bad evaluation
    assert not guard.update(0.5, 0.47)  # within tolerance: resets
    assert not guard.update(0.5, 0.40)
    assert guard.update(0.5, 0.40)
    lower = MapGuard("deletion_auc", higher_is_better=False, tolerance=0.0, patience=1)
    assert lower.update(0.1, 0.2) and not lower.update(0.1, 0.05)


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_images=1"):
        MonitorSettings(max_images=1)
    with pytest.raises(ValueError, match="iou_fraction=1.5"):
        MonitorSettings(iou_fraction=1.5)
    for limit in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"majority_limit={limit} must lie in"):
            MonitorSettings(majority_limit=limit)


def make_args(tmp_path, **overrides) -> AFTConfig:
    """test_trainer's settings, run for 4 steps with an evaluation every 2."""
    evaluation = dict(max_steps=4, per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2)
    return trainer_args(tmp_path, **{**evaluation, **overrides})


@pytest.fixture(scope="module")
def scenes():
    return masked_scenes(24), masked_scenes(8, seed=1)


def scene_monitor(held_out, settings=None, mask_column="mask") -> MapMonitor:
    """The monitor on `held_out`, with the shipped tiny CLIP's vision tower as the base."""
    processor = CLIPImageProcessorPil.from_pretrained(TINY)
    base = CLIPVisionModelWithProjection.from_pretrained(TINY)
    settings = settings or MonitorSettings(batch_size=8, stop_after_collapses=0)
    return MapMonitor.from_dataset(base, held_out, processor, mask_column=mask_column, settings=settings)


def monitored_trainer(tmp_path, scenes, settings=None, mask_column="mask", monitor_steps=None, **overrides):
    """An AFTTrainer with the monitor attached in one line, and no eval_dataset."""
    train, held_out = scenes
    callback = MapMonitorCallback(scene_monitor(held_out, settings, mask_column), monitor_steps=monitor_steps)
    trainer = AFTTrainer(TINY, args=make_args(tmp_path, **overrides), train_dataset=train, callbacks=[callback])
    return trainer, callback


def count_attacks(trainer) -> list[bool]:
    """Record `model.training` at every AFT loss (attack included) the trainer computes."""
    calls, compute_loss = [], trainer.compute_loss

    def counted(model, inputs, *args, **kwargs):
        calls.append(model.training)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted
    return calls


def test_one_line_callback_logs_every_evaluation_without_attacking_the_held_out_images(tmp_path, scenes):
    trainer, callback = monitored_trainer(
        tmp_path, scenes, save_strategy="steps", save_steps=2, metric_for_best_model="gini"
    )
    attacks = count_attacks(trainer)
    trainer.train()
    logged = [(entry["step"], entry) for entry in trainer.state.log_history if "eval_energy_pointing_game" in entry]
    assert [step for step, _ in logged] == [0, 2, 4]
    assert logged[0][1]["eval_embedding_drift"] == pytest.approx(0.0, abs=1e-10)  # the base against itself
    for _, entry in logged:
        for name in ("gini", "pointing_game", "energy_pointing_game", "top_k_iou", "embedding_spread"):
            assert 0.0 <= entry[f"eval_{name}"] <= 1.0 + 1e-6
    assert logged[-1][1]["eval_embedding_drift"] > 0  # the weights moved (lr 1e-3)
    assert all(entry["eval_monitor_seconds"] >= 0 for _, entry in logged[1:])  # the cost of each evaluation
    # The AFT loss (and its attack) ran on the 4 training batches only, never in an evaluation.
    assert attacks == [True] * 4 and not any("eval_loss" in entry for entry in trainer.state.log_history)
    summary = callback.summary()
    assert summary["metric"] == "gini" and summary["final_step"] == 4 and summary["verdict"]


def test_monitor_steps_without_any_evaluation_schedule(tmp_path, scenes):
    trainer, callback = monitored_trainer(tmp_path, scenes, monitor_steps=2, eval_strategy="no")
    attacks = count_attacks(trainer)
    trainer.train()
    assert [step for step, _ in callback.history] == [0, 2, 4] and attacks == [True] * 4
    # The tiny tower at lr 1e-3 collapses by step 2 (spread below a quarter of the base's): its final weights are
    # not handed back, the base's are.
    summary = callback.summary()
    assert summary["collapsed_steps"] == [2, 4] and summary["exported_step"] == 0
    assert "The exported weights are the base's: the final weights (step 4) had collapsed." in summary["verdict"]


def test_a_monitor_that_cannot_run_raises_before_training(tmp_path, scenes):
    train, held_out = scenes
    with pytest.raises(RuntimeError, match="not bound to a trainer"):  # a plain Trainer never binds it
        Trainer(
            CLIPVisionModelWithProjection.from_pretrained(TINY),
            args=make_args(tmp_path, eval_strategy="no"),
            callbacks=[MapMonitorCallback(scene_monitor(held_out))],
        ).callback_handler.on_train_begin(make_args(tmp_path), TrainerState(), TrainerControl())
    trainer, _ = monitored_trainer(tmp_path / "never", scenes, eval_strategy="no")
    with pytest.raises(ValueError, match="would never measure: eval_strategy='no' and no monitor_steps"):
        trainer.train()
    trainer, _ = monitored_trainer(
        tmp_path / "no-masks", scenes, mask_column=None, metric_for_best_model="energy_pointing_game"
    )
    with pytest.raises(ValueError, match=r"metric_for_best_model='energy_pointing_game' needs object masks.*mask"):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(ValueError, match="monitor_steps=0"):
        MapMonitorCallback(scene_monitor(held_out), monitor_steps=0)


def test_greater_is_better_follows_the_registry(tmp_path, scenes):
    # deletion_auc (mask-free) is lower-is-better, though transformers guesses "greater" for any non-loss name.
    trainer, callback = monitored_trainer(tmp_path, scenes, mask_column=None, metric_for_best_model="deletion_auc")
    callback.bind_trainer(trainer)
    assert trainer.args.greater_is_better is False


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_every_evaluation_worse_than_the_base_exports_the_base(tmp_path, lora):
    out = tmp_path / "worse"
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer, callback = planted_run(out, {0: 0.5, 2: 0.3, 4: 0.2}, peft_config=peft_config)
    assert callback.history[-1][1]["embedding_drift"] > 0  # the weights did move before the base was restored
    base = CLIPModel.from_pretrained(TINY).vision_model.state_dict()
    exported = CLIPModel.from_pretrained(out).vision_model.state_dict()
    assert all(torch.equal(base[name], exported[name]) for name in base)  # bit for bit
    summary = callback.summary()
    assert summary["exported_step"] == 0 and summary["exported_is_base"] and summary["improved"] is False
    assert "AFT did not improve top_k_iou over the base; the exported weights are the base's." in summary["verdict"]
    record = TrainingRecord.load(out)
    assert record.training_evaluation["verdict"] == summary["verdict"]
    card = (out / "README.md").read_text()
    assert "the exported weights are the base's" in card


def test_a_collapsed_checkpoint_never_becomes_the_best(tmp_path):
    """Step 2 scores best on the selection metric, but the encoder has collapsed there (and at step 4): no
    checkpoint is the best, and the base is exported, saying why."""
    out = tmp_path / "collapsed"
    trainer, callback = planted_run(out, {0: 0.5, 2: 0.7, 4: 0.6}, collapse_ratio=0.25)
    summary = callback.summary()
    assert summary["collapsed_steps"] == [2, 4] and trainer.state.best_model_checkpoint is None
    assert summary["exported_step"] == 0 and summary["best_step"] == 0 and summary["improved"] is False
    assert (
        "The exported weights are the base's: no checkpoint beat the base without collapsing (better but collapsed: "
        "step 2, 4)." in summary["verdict"]
    )
    base = CLIPModel.from_pretrained(TINY).vision_model.state_dict()
    exported = CLIPModel.from_pretrained(out).vision_model.state_dict()
    assert all(torch.equal(base[name], exported[name]) for name in base)


def test_the_best_checkpoint_is_exported_bit_for_bit_and_survives_a_sigkill(tmp_path):
    """Improves at step 2 then degrades: the export is checkpoint-2's weights, and a run SIGKILLed at step 3 and
    resumed ends with the same export and the same record as the uninterrupted run."""
    schedule = {0: 0.5, 2: 0.7, 4: 0.4}
    command = [sys.executable, str(Path(__file__).with_name("planted_monitor_run.py")), str(tmp_path / "killed")]
    command += ["--schedule", ",".join(f"{step}:{value}" for step, value in schedule.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([*command, "--kill_at", "3"], env=env)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' arithmetic, so that the numbers agree to the bit
    try:
        planted_run(tmp_path / "whole", schedule)
    finally:
        torch.set_num_threads(threads)
    assert killed.wait(timeout=300) == -9  # SIGKILL, after checkpoint-2 was complete
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["checkpoint-2"]
    assert subprocess.run([*command, "--resume"], env=env, timeout=300).returncode == 0

    for out in (tmp_path / "whole", tmp_path / "killed"):
        state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] == str(out / "checkpoint-2")
        best = load_file(out / "checkpoint-2" / "model.safetensors")
        exported = CLIPModel.from_pretrained(out).vision_model.state_dict()
        assert all(
            torch.equal(exported[name.removeprefix("vision_model.")], value)
            for name, value in best.items()
            if name.startswith("vision_model.")
        )
    records = [TrainingRecord.load(tmp_path / name).to_dict() for name in ("whole", "killed")]
    for record in records:
        record.pop("train_runtime_s")
    assert records[0] == records[1]
    summary = records[0]["training_evaluation"]
    assert summary["exported_step"] == 2 and summary["best_step"] == 2 and summary["improved"] is True
    assert [summary["base"][METRIC], summary["best"][METRIC], summary["final"][METRIC]] == [0.5, 0.7, 0.4]
    assert "The exported weights (step 2) improve top_k_iou over the base: 0.5000 → 0.7000." in summary["verdict"]


class CorruptModel(TrainerCallback):
    """Planted degradation: after the first step the patch embedding is zeroed (with learning rate 0 it stays so):
    every image gets the same embedding and an all-zero map."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                model.vision_model.embeddings.patch_embedding.weight.zero_()


@pytest.mark.parametrize(
    ("settings", "stopped_at"),
    [
        (MonitorSettings(batch_size=8, guard_patience=1, stop_if_maps_worse=True), 2),  # at the first warning
        (MonitorSettings(batch_size=8, stop_after_collapses=2), 4),  # after two collapsed measurements in a row
        (MonitorSettings(batch_size=8), 6),  # the default: warn, never stop for collapse
    ],
)
def test_guard_and_collapse_fire_on_a_planted_degradation_and_stop(tmp_path, scenes, settings, stopped_at):
    trainer, callback = monitored_trainer(
        tmp_path, scenes, settings=settings, learning_rate=0.0, allow_no_op=True, max_steps=6
    )
    trainer.add_callback(CorruptModel())
    trainer.train()
    assert any("heading towards a constant output" in w for w in callback.warnings)
    assert any("worse than the base's: energy_pointing_game" in w for w in callback.warnings)
    assert trainer.state.global_step == stopped_at
    assert "warning(s) raised, the first: Step 2:" in callback.summary()["verdict"]


@pytest.mark.parametrize(
    ("settings", "collapsed"),
    [
        (MonitorSettings(), ["spread", "one class"]),
        (MonitorSettings(collapse_ratio=0.0), ["one class"]),
        (MonitorSettings(majority_limit=0.7), ["spread"]),  # 60 % of the predictions: below this limit
        (MonitorSettings(collapse_ratio=0.0, majority_limit=1.0), []),  # both checks off
    ],
)
def test_collapse_known_answers(scenes, settings, collapsed):
    callback = MapMonitorCallback(scene_monitor(scenes[1], settings))
    callback.history = [(0, {"embedding_spread": 0.40, "majority_share": 0.25})]
    problems = callback._collapse_problems({"embedding_spread": 0.09, "majority_share": 0.60})
    assert [("spread" if "spread" in p else "one class") for p in problems] == collapsed


def test_guard_stays_quiet_on_the_clean_control(tmp_path, scenes):
    settings = MonitorSettings(batch_size=8, guard_patience=1, stop_if_maps_worse=True)
    trainer, callback = monitored_trainer(
        tmp_path, scenes, settings=settings, attack_eps=0.0, weight_decay=0.0, allow_no_op=True
    )
    trainer.train()
    assert callback.warnings == [] and trainer.state.global_step == 4
    final = callback.history[-1][1]
    assert final["embedding_drift"] == pytest.approx(0.0, abs=1e-10)
    assert "No warning raised." in callback.summary()["verdict"]


def test_verdict_known_answers():
    base = {"deletion_auc": 0.30, "gini": 0.50}
    summary = dict(
        metric="deletion_auc", num_images=4, method="simple_gradient", base=base, best_step=2,
        best={"deletion_auc": 0.20, "gini": 0.6}, final_step=4, final={"deletion_auc": 0.35, "gini": 0.4},
        exported_step=4, exported={"deletion_auc": 0.35, "gini": 0.4}, exported_is_base=False, improved=False,
        base_not_candidate="load_best_model_at_end is off, so the final weights are exported", warnings=[],
    )  # fmt: skip
    text = verdict_text(summary)
    assert text.startswith("Map monitor verdict (4 held-out images, simple_gradient maps; selection metric deletion_")
    assert "base 0.3000, best 0.2000 (step 2), final 0.3500 (step 4)." in text
    assert "The exported weights (step 4) do NOT improve deletion_auc over the base (0.3000 → 0.3500): " in text
    assert "Base → best → final: gini 0.5000 → 0.6000 → 0.4000." in text


def monitored_demo_run(out, *flags: str) -> None:
    """The train command on the demo config for 2 steps, monitored at step 2 on 4 of its photos, plus `flags`."""
    from hf_clip_aft.cli import run_command

    monitored = ["--output_dir", str(out), "--max_steps", "2", "--attack_steps", "2", "--monitor_steps", "2"]
    # The photos have one split; a real run holds out a validation split.
    monitored += ["--monitor_maps", "true", "--monitor_split", "train", "--monitor_max_images", "4"]
    run_command("train", ["recipes/configs/demo.yaml", *monitored, *flags])


def test_train_command_monitors_and_cards_the_training_time_evaluation(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    monitored_demo_run(out)
    record = TrainingRecord.load(out)
    summary = record.training_evaluation
    assert summary["metric"] == "deletion_auc" and summary["num_images"] == 4 and summary["final_step"] == 2
    assert {"accuracy", "majority_share", "gini", "insertion_auc"} <= set(summary["base"])  # the photos are labelled
    card = (out / "README.md").read_text()
    assert "### Interpretability during training" in card and summary["verdict"] in card
    assert f"| deletion_auc | {summary['base']['deletion_auc']:.4f} |" in card
    shown = capsys.readouterr().out if summary["improved"] else caplog.text  # printed, or logged as a warning
    assert summary["verdict"] in shown


def test_train_command_refuses_monitoring_without_evaluations(tmp_path):
    from hf_clip_aft.cli import run_command

    with pytest.raises(ValueError, match="eval_strategy='no' and no monitor_steps"):
        run_command("train", ["recipes/configs/demo.yaml", "--output_dir", str(tmp_path), "--monitor_maps", "true"])
