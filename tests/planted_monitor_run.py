"""A monitored AFT run whose selection metric is planted per step (test_monitor.py runs it in-process and, for the
kill-and-resume case, as a subprocess that SIGKILLs itself).

    python tests/planted_monitor_run.py OUTPUT_DIR --schedule 0:0.5,2:0.7,4:0.4,6:0.3 [--kill_at 3] [--resume]

The run trains the shipped tiny CLIP for real (lr 1e-3) on masked scenes, evaluates and checkpoints every 2 steps,
selects the best checkpoint by ``top_k_iou`` with ``load_best_model_at_end``, and exports to OUTPUT_DIR. The monitor
measures every number for real, then replaces ``top_k_iou`` by the schedule's value at the current step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hf_clip_aft import AFTTrainer  # noqa: E402
from hf_clip_aft.interpret.monitor import MapMonitor, MapMonitorCallback, MonitorSettings  # noqa: E402
from test_trainer import make_args  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets" / "tiny-clip")
METRIC = "top_k_iou"


def masked_scenes(count: int, size: int = 64, seed: int = 0) -> datasets.Dataset:
    """A bright square on a dark noisy background; the mask is the square (value 1: 255 would mean unannotated, the
    evaluation's mask rule); the class is its colour."""
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    for _ in range(count):
        pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        side = int(rng.integers(16, 28))
        top, left = (int(v) for v in rng.integers(0, size - side, size=2))
        label = int(rng.integers(0, 2))
        pixels[top : top + side, left : left + side] = (230, 40, 40) if label == 0 else (40, 40, 230)
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[top : top + side, left : left + side] = 1
        images.append(Image.fromarray(pixels))
        masks.append(Image.fromarray(mask))
        labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])}
    )
    return datasets.Dataset.from_dict({"image": images, "mask": masks, "label": labels}, features=features)


class PlantedMonitor(MapMonitor):
    """Every number measured, then `METRIC` replaced by ``schedule[clock()]`` (clock: the trainer's step)."""

    schedule: dict[int, float]
    clock = None

    def measure(self, model):
        values = super().measure(model)
        values[METRIC] = self.schedule[self.clock()]
        return values


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of optimiser step `step` (no cleanup runs, as with a real kill)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def planted_run(
    output_dir: Path,
    schedule: dict[int, float],
    kill_at: int | None = None,
    resume: bool = False,
    peft_config=None,
    collapse_ratio: float = 0.0,
):
    """The monitored trainer (trained and exported unless killed) and its monitor callback. The tiny tower at lr 1e-3
    bunches its embeddings within two steps; the collapse check (which rules such checkpoints out) is off unless
    `collapse_ratio` turns it on."""
    torch.manual_seed(0)
    train, held_out = masked_scenes(24), masked_scenes(8, seed=1)
    processor = CLIPImageProcessorPil.from_pretrained(TINY)
    base = CLIPVisionModelWithProjection.from_pretrained(TINY)
    settings = MonitorSettings(batch_size=8, collapse_ratio=collapse_ratio)
    monitor = PlantedMonitor.from_dataset(base, held_out, processor, mask_column="mask", settings=settings)
    monitor.schedule = schedule
    callback = MapMonitorCallback(monitor)
    args = make_args(
        output_dir.parent,
        output_dir=str(output_dir),
        max_steps=max(schedule),
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model=METRIC,
        load_best_model_at_end=True,
    )
    callbacks = [callback] + ([KillAt(kill_at)] if kill_at else [])
    trainer = AFTTrainer(
        TINY, args=args, train_dataset=train, processing_class=processor, callbacks=callbacks, peft_config=peft_config
    )
    monitor.clock = lambda: trainer.state.global_step
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model()
    return trainer, callback


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--schedule", required=True, help="step:value pairs, comma-separated")
    parser.add_argument("--kill_at", type=int)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    planted = {int(k): float(v) for k, v in (pair.split(":") for pair in options.schedule.split(","))}
    planted_run(options.output_dir, planted, options.kill_at, options.resume)
