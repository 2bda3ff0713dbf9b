"""Fine-tuning variants of the base tower, all through the library's `AFTTrainer` from the same start.

Every variant uses the same loss (FARE: ``||f(x + δ*) − f0(x)||²``), optimiser, schedule, steps, batch size and
data order (the trainer's seeded sampler); only the inner maximisation differs. Budgets are in units of 1/255, as in
:class:`hf_clip_aft.AFTConfig`. The paper's ratios are kept when ε changes: step α, penalty η and smoothing σ are
by default each ε/4 (paper: ε = 4, α = η = σ = 1, K = 10).

Weight decay is 0 by default (the paper uses 1e-4): with decay the `clean` control (ε = 0) is not a no-op, because
decay alone moves the weights off the frozen base, the FARE loss then has a small gradient, and Adam turns it into
full learning-rate steps. Without decay its gradient is exactly zero and it stays at the base bit for bit
(`tests/test_laptop_scale.py`); all variants share the setting so that they still differ only in the attack.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection, PrinterCallback, TrainerCallback

from hf_clip_aft import AFTConfig, AFTTrainer
from hf_clip_aft.data import AFTDataCollator
from hf_clip_aft.interpret.monitor import MapMonitor, MapMonitorCallback

# Step size of the random-perturbation control: one PGD step this small leaves δ at its uniform random start.
NEGLIGIBLE_STEP = 1e-3

VARIANTS = ("clean", "random", "aft", "aft_no_noise", "aft_linf")
VARIANT_DESCRIPTIONS = {
    "base": "the pre-trained tower, not fine-tuned",
    "clean": "control: same loss, no attack (ε = 0)",
    "random": "control: same loss on a uniform random δ in the ε-box (no ascent step)",
    "aft": "AFT as in the paper: PGD, huber penalty η, smoothing σ",
    "aft_no_noise": "ablation: AFT without the smoothing noise (σ = 0)",
    "aft_linf": "ablation: AFT without the norm penalty (attack_norm = linf)",
}


@dataclass(frozen=True)
class FinetuneSpec:
    """What all variants share. `eps` is the AFT radius in units of 1/255; the PGD step, the penalty scale η and
    the smoothing σ are given as fractions of it (the paper's: 1/4 each). `monitor_steps`: optimiser steps between
    the map monitor's measurements when a monitor is given to :func:`finetune` (its library defaults otherwise)."""

    eps: float = 8.0
    steps: int = 150
    batch_size: int = 64
    learning_rate: float = 1e-4
    attack_steps: int = 10
    step_ratio: float = 0.25
    eta_ratio: float = 0.25
    sigma_ratio: float = 0.25
    weight_decay: float = 0.0
    monitor_steps: int = 15


def attack_settings(variant: str, spec: FinetuneSpec) -> dict[str, Any]:
    """The `AFTConfig` attack fields of `variant` (one of :data:`VARIANTS`)."""
    paper = dict(
        attack_eps=spec.eps,
        attack_step_size=spec.step_ratio * spec.eps,
        attack_steps=spec.attack_steps,
        attack_eta=spec.eta_ratio * spec.eps,
        noise_sigma=spec.sigma_ratio * spec.eps,
        attack_norm="huber",
    )
    if variant == "aft":
        return paper
    if variant == "aft_no_noise":
        return {**paper, "noise_sigma": 0.0}
    if variant == "aft_linf":
        return {**paper, "attack_norm": "linf"}
    if variant == "clean":
        return {**paper, "attack_eps": 0.0}
    if variant == "random":
        return {**paper, "attack_steps": 1, "attack_step_size": NEGLIGIBLE_STEP, "noise_sigma": 0.0}
    raise ValueError(f"variant={variant!r} is not one of {VARIANTS}.")


class _RecordingCollator(AFTDataCollator):
    """The trainer's collator, also recording a fingerprint of every batch (to check the data order is shared)."""

    def __init__(self, image_processor: CLIPImageProcessorPil) -> None:
        super().__init__(image_processor)
        self.fingerprints: list[float] = []

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        weights = torch.arange(1, batch["pixel_values"].shape[0] + 1, dtype=torch.float64).view(-1, 1, 1, 1)
        self.fingerprints.append(round((batch["pixel_values"].double() * weights).sum().item(), 3))
        return batch


@dataclass
class FinetuneResult:
    model: CLIPVisionModelWithProjection
    log_history: list[dict[str, float]]
    fingerprints: list[float]
    training_evaluation: dict[str, Any] | None = None  # the map monitor's summary and verdict, when monitored


def finetune(
    base: CLIPVisionModelWithProjection,
    image_processor: CLIPImageProcessorPil,
    train_images: datasets.Dataset,
    variant: str,
    spec: FinetuneSpec,
    seed: int,
    callbacks: list[TrainerCallback] | None = None,
    overrides: dict[str, Any] | None = None,
    monitor: MapMonitor | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of `base` as `variant`; `base` itself is left untouched.

    `train_images` needs an ``image`` column. Paper optimiser (AdamW β = (0.9, 0.95), cosine schedule, 7% warm-up)
    at `spec`'s learning rate, weight decay, steps and batch size. `callbacks` are added to the trainer (e.g. to
    measure the model during training). `overrides`: further `AFTConfig` fields, applied last (e.g. an
    ``attack_schedule``, experiments/cheaper_aft; or ``save_strategy``, which is "no" unless overridden, with
    ``load_best_model_at_end``). `monitor`: the library's map monitor, attached as a user would
    (one callback, measuring every ``spec.monitor_steps`` steps with its default settings); its verdict is returned.
    """
    with tempfile.TemporaryDirectory() as output_dir:
        args = AFTConfig(
            output_dir=output_dir,
            use_cpu=True,
            max_steps=spec.steps,
            per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            weight_decay=spec.weight_decay,
            logging_steps=max(1, spec.steps // 10),
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
            allow_no_op=variant == "clean",  # the clean control has no attack, on purpose
            # No checkpoints unless `overrides` asks (e.g. save_steps with load_best_model_at_end).
            **{"save_strategy": "no", **attack_settings(variant, spec), **(overrides or {})},
        )
        collator = _RecordingCollator(image_processor)
        trainer = AFTTrainer(
            copy.deepcopy(base),
            args=args,
            train_dataset=train_images,
            processing_class=image_processor,
            data_collator=collator,
            callbacks=[*(callbacks or []), *([MapMonitorCallback(monitor, spec.monitor_steps)] if monitor else [])],
        )
        trainer.remove_callback(PrinterCallback)  # the log history is returned; printing it would flood the run
        trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    return FinetuneResult(model, trainer.state.log_history, collator.fingerprints, trainer.training_evaluation)
