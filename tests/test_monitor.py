"""Interpretability during training: the monitor's numbers, the callback's steps, best checkpoint, guard, collapse."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPImageProcessorPil, TrainerCallback

from hf_clip_aft import AFTConfig, AFTTrainer
from hf_clip_aft.interpret.monitor import (
    MapGuard,
    MapMonitor,
    MapMonitorCallback,
    MonitorSettings,
    embedding_spread,
    majority_share,
)
from test_trainer import make_args as trainer_args


def masked_scenes(count: int, size: int = 64, seed: int = 0) -> datasets.Dataset:
    """A bright square on a dark noisy background; the mask is the square; the class is its colour."""
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for _ in range(count):
        pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        side = int(rng.integers(16, 28))
        top, left = (int(v) for v in rng.integers(0, size - side, size=2))
        label = int(rng.integers(0, 2))
        pixels[top : top + side, left : left + side] = (230, 40, 40) if label == 0 else (40, 40, 230)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[top : top + side, left : left + side] = 255
        images.append(Image.fromarray(pixels))
        masks.append(Image.fromarray(mask))
        labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])}
    )
    return datasets.Dataset.from_dict({"image": images, "mask": masks, "label": labels}, features=features)


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


def make_args(tmp_path, **overrides) -> AFTConfig:
    """test_trainer's settings, run for 4 steps with an evaluation every 2."""
    evaluation = dict(max_steps=4, per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=2)
    return trainer_args(tmp_path, **{**evaluation, **overrides})


@pytest.fixture(scope="module")
def scenes():
    return masked_scenes(24), masked_scenes(8, seed=1)


def monitored_trainer(tmp_path, tiny_clip_path, scenes, settings=None, mask_column="mask", **overrides):
    train, held_out = scenes
    trainer = AFTTrainer(
        tiny_clip_path, args=make_args(tmp_path, **overrides), train_dataset=train, eval_dataset=held_out
    )
    processor = CLIPImageProcessorPil.from_pretrained(tiny_clip_path)
    settings = settings or MonitorSettings(batch_size=8)
    monitor = MapMonitor.from_dataset(trainer.model, held_out, processor, mask_column=mask_column, settings=settings)
    callback = MapMonitorCallback(trainer, monitor)
    trainer.add_callback(callback)
    return trainer, callback


def test_callback_logs_every_evaluation_and_the_best_checkpoint_is_exported(tmp_path, tiny_clip_path, scenes):
    trainer, callback = monitored_trainer(
        tmp_path,
        tiny_clip_path,
        scenes,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model="top_k_iou",
        load_best_model_at_end=True,
    )
    trainer.train()
    logged = [(entry["step"], entry) for entry in trainer.state.log_history if "eval_energy_pointing_game" in entry]
    assert [step for step, _ in logged] == [0, 2, 4]
    base = logged[0][1]
    assert base["eval_embedding_drift"] == pytest.approx(0.0, abs=1e-10)  # the base against itself
    for _, entry in logged:
        for name in ("gini", "pointing_game", "energy_pointing_game", "top_k_iou", "embedding_spread"):
            assert 0.0 <= entry[f"eval_{name}"] <= 1.0 + 1e-6
    assert logged[-1][1]["eval_embedding_drift"] > 0  # the weights moved (lr 1e-3)
    values = {step: v["top_k_iou"] for step, v in callback.history[1:]}
    best_step = max(values, key=values.get)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert trainer.state.best_metric == pytest.approx(values[best_step])
    # load_best_model_at_end: the model the run ends with (and exports) is the best checkpoint's.
    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    state = trainer.model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in best.items())
    summary = callback.summary()
    assert summary["metric"] == "energy_pointing_game" and summary["final_step"] == 4
    assert summary["exported_step"] == best_step


def test_greater_is_better_follows_the_registry(tmp_path, tiny_clip_path, scenes):
    # deletion_auc (mask-free) is lower-is-better, though transformers guesses "greater" for any non-loss name.
    trainer, _ = monitored_trainer(
        tmp_path, tiny_clip_path, scenes, mask_column=None, metric_for_best_model="deletion_auc"
    )
    assert trainer.args.greater_is_better is False


class CorruptModel(TrainerCallback):
    """Planted degradation: after the first step the patch embedding is zeroed (with learning rate 0 it stays so):
    every image gets the same embedding and an all-zero map."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                model.vision_model.embeddings.patch_embedding.weight.zero_()


def test_guard_and_collapse_fire_on_a_planted_degradation_and_stop(tmp_path, tiny_clip_path, scenes, caplog):
    settings = MonitorSettings(batch_size=8, guard_patience=1, stop_if_maps_worse=True)
    trainer, callback = monitored_trainer(
        tmp_path, tiny_clip_path, scenes, settings=settings, learning_rate=0.0, allow_no_op=True
    )
    trainer.add_callback(CorruptModel())
    trainer.train()
    assert any("heading towards a constant output" in w for w in callback.warnings)
    assert any("worse than the base's: energy_pointing_game" in w for w in callback.warnings)
    assert trainer.state.global_step == 2  # stopped at the first evaluation


def test_guard_stays_quiet_on_the_clean_control(tmp_path, tiny_clip_path, scenes):
    settings = MonitorSettings(batch_size=8, guard_patience=1, stop_if_maps_worse=True)
    trainer, callback = monitored_trainer(
        tmp_path, tiny_clip_path, scenes, settings=settings, attack_eps=0.0, weight_decay=0.0, allow_no_op=True
    )
    trainer.train()
    assert callback.warnings == [] and trainer.state.global_step == 4
    final = callback.history[-1][1]
    assert final["embedding_drift"] == pytest.approx(0.0, abs=1e-10)


def test_train_command_monitors_and_cards_the_training_time_evaluation(tmp_path):
    from hf_clip_aft.cli import run_command
    from hf_clip_aft.release.record import TrainingRecord

    out = tmp_path / "out"
    flags = {
        "--output_dir": str(out),
        "--max_steps": "2",
        "--attack_steps": "2",
        "--eval_strategy": "steps",
        "--eval_steps": "2",
        "--monitor_maps": "true",
        "--monitor_split": "train",  # the photos have one split; a real run holds out a validation split
        "--monitor_max_images": "4",
    }
    run_command("train", ["recipes/configs/demo.yaml", *(x for pair in flags.items() for x in pair)])
    record = TrainingRecord.load(out)
    summary = record.training_evaluation
    assert summary["metric"] == "deletion_auc" and summary["num_images"] == 4 and summary["final_step"] == 2
    assert {"accuracy", "majority_share", "gini", "insertion_auc"} <= set(summary["base"])  # the photos are labelled
    card = (out / "README.md").read_text()
    assert "### Interpretability during training" in card
    assert f"| deletion_auc | {summary['base']['deletion_auc']:.4f} |" in card


def test_train_command_refuses_monitoring_without_evaluations(tmp_path):
    from hf_clip_aft.cli import run_command

    with pytest.raises(ValueError, match="eval_strategy='no'"):
        run_command("train", ["recipes/configs/demo.yaml", "--output_dir", str(tmp_path), "--monitor_maps", "true"])
