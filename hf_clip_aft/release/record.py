"""The training record: what a run was (base model, method, budgets, setup, hardware, length), saved by the trainer.

The trainer writes it as ``training_record.json`` into the exported model folder; every release step after training
(the card, a re-export, a push) reads it from there. It names no local path (local models and datasets appear by
folder name) and holds no token.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from ..config import AFTConfig
from ..files import write_json_atomic
from .names import on_hub, public_name

RECORD_NAME = "training_record.json"
LEGACY_RECORD_NAME = "aft_training.json"  # what exports written before the record was introduced hold
RECORD_SCHEMA = "hf_clip_aft.training/v2"
_READABLE_SCHEMAS = (RECORD_SCHEMA, "hf_clip_aft.training/v1")  # v1 lacks `skipped_images` and `budget_unit`

# The AFT fields of AFTConfig and the TrainingArguments the card reports, in the card's order.
HYPERPARAMETERS = (
    "attack_eps", "attack_step_size", "attack_steps", "attack_norm", "attack_eta", "noise_sigma", "loss_type",
    "clean_weight", "embedding_normalize", "prompt_template", "learning_rate", "lr_scheduler_type", "warmup_steps",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm",
    "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed",
    "attack_schedule", "attack_early_stop", "attack_fgsm_step", "attack_replays", "attack_carry_reset_epochs",
)  # fmt: skip


def hardware_description(device: torch.device | str, num_processes: int = 1) -> str:
    """``"<processes> × <device name>"``, e.g. ``"8 × NVIDIA H100 80GB HBM3"`` or ``"2 × CPU"``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif device.type == "xpu":
        name = torch.xpu.get_device_name(device)
    else:
        name = {"cpu": "CPU", "mps": "Apple GPU (MPS)"}.get(device.type, device.type)
    return f"{num_processes} × {name}"


def precision_description(args: AFTConfig) -> str:
    """The run's arithmetic, e.g. ``"bf16 mixed precision, TF32 matmuls"`` or ``"fp32"``."""
    precision = "bf16 mixed precision" if args.bf16 else "fp16 mixed precision" if args.fp16 else "fp32"
    return precision + (", TF32 matmuls" if args.tf32 else "")


def _hyperparameters(args: AFTConfig) -> dict[str, Any]:
    hp = {name: getattr(args, name) for name in HYPERPARAMETERS}
    hp = {k: getattr(v, "value", v) for k, v in hp.items()}  # enums (scheduler, optimiser) as their names
    hp.update(num_processes=args.world_size, precision=precision_description(args))
    return hp


@dataclass
class TrainingRecord:
    """What a fine-tuning run was, as JSON-able data; None where it is unknown (e.g. weights imported, not trained).

    Attributes:
        base_model: the CLIP that was fine-tuned: its Hub id, or a local folder's name.
        base_model_on_hub: whether `base_model` is a Hub id.
        dataset: the training set: its Hub id, or a local folder's name.
        dataset_on_hub: whether `dataset` is a Hub id.
        hyperparameters: the AFT method and its budgets (``attack_eps``, ``attack_step_size``, ``attack_eta``,
            ``noise_sigma`` in units of `budget_unit`), the optimiser, schedule and batch setup (the
            :data:`HYPERPARAMETERS` fields of `AFTConfig`), ``num_processes`` and ``precision``.
        budget_unit: the unit of the attack budgets: 1/255 of the [0, 1] pixel range.
        hardware: e.g. ``"8 × NVIDIA H100 80GB HBM3"`` (:func:`hardware_description`).
        global_steps: optimiser steps run.
        train_runtime_s: wall-clock training time, in seconds.
        skipped_images: train images skipped because they could not be decoded.
        weights_source: for weights imported rather than trained here, the checkpoint they came from (a Hub repo
            and file, or a local file's name).
        versions: ``{package: version}`` of hf_clip_aft, transformers and torch in the run.
        training_evaluation: the interpretability measured during training by the map monitor
            (:meth:`hf_clip_aft.interpret.monitor.MapMonitorCallback.summary`): the selection ``metric``, the
            ``base`` values at step 0, the ``best`` values at ``best_step``, the ``final`` values at ``final_step``,
            the ``exported`` values at ``exported_step`` (0 and ``exported_is_base`` when no checkpoint beat the
            base and its weights were exported), ``improved`` (the export beats the base on ``metric``), the
            ``warnings`` raised, every measurement (``history``) and the one-paragraph ``verdict``; None when the
            run was not monitored.
    """

    base_model: str | None = None
    base_model_on_hub: bool | None = None
    dataset: str | None = None
    dataset_on_hub: bool | None = None
    hyperparameters: dict[str, Any] | None = None
    budget_unit: str = "1/255"
    hardware: str | None = None
    global_steps: int | None = None
    train_runtime_s: float | None = None
    skipped_images: int | None = None
    weights_source: str | None = None
    versions: dict[str, str] | None = None
    training_evaluation: dict[str, Any] | None = None
    schema: str = RECORD_SCHEMA

    @classmethod
    def from_config(
        cls,
        args: AFTConfig | None,
        *,
        base_model: str | None = None,
        dataset_name: str | None = None,
        train_runtime: float | None = None,
        hardware: str | None = None,
        global_steps: int | None = None,
        skipped_images: int | None = None,
        weights_source: str | None = None,
        training_evaluation: dict[str, Any] | None = None,
    ) -> TrainingRecord:
        """The record of a run configured by `args` (None: weights not trained here), with the installed versions.

        `base_model`, `dataset_name` and `weights_source` may be local paths: only their folder or file name is kept.
        """
        record = cls(
            hyperparameters=_hyperparameters(args) if args is not None else None,
            versions={p: version(p) for p in ("hf_clip_aft", "transformers", "torch")} if args is not None else None,
            hardware=hardware,
            global_steps=global_steps,
            train_runtime_s=train_runtime,
            skipped_images=skipped_images,
            training_evaluation=training_evaluation,
        )
        return record.with_sources(base_model=base_model, dataset_name=dataset_name, weights_source=weights_source)

    def with_sources(
        self, *, base_model: str | None = None, dataset_name: str | None = None, weights_source: str | None = None
    ) -> TrainingRecord:
        """A copy naming these sources (by public name); those passed as None keep the recorded value."""
        changes: dict[str, Any] = {}
        if base_model:
            changes.update(base_model=public_name(base_model), base_model_on_hub=on_hub(base_model))
        if dataset_name:
            changes.update(dataset=public_name(dataset_name), dataset_on_hub=on_hub(dataset_name))
        if weights_source:
            changes.update(weights_source=public_name(weights_source))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingRecord:
        """A record from its JSON form (the current schema or the older ``aft_training.json`` one)."""
        if not isinstance(data, dict) or data.get("schema") not in _READABLE_SCHEMAS:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"Not a training record (schema {found!r}, expected {RECORD_SCHEMA!r}).")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in known}, "schema": RECORD_SCHEMA})

    def save(self, folder: str | Path) -> Path:
        """Write ``training_record.json`` into `folder` atomically (a temporary file, then a rename)."""
        path = Path(folder) / RECORD_NAME
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> TrainingRecord | None:
        """The record of a model or checkpoint folder, or None when it holds none.

        Read from ``training_record.json`` (which the trainer also writes into every checkpoint-N) or an older
        export's ``aft_training.json``. A checkpoint's pickled ``training_args.bin`` is never read: unpickling it
        would need ``weights_only=False``, i.e. running whatever code the file holds.
        """
        folder = Path(folder)
        for name in (RECORD_NAME, LEGACY_RECORD_NAME):
            if (folder / name).is_file():
                return cls.from_dict(json.loads((folder / name).read_text(encoding="utf-8")))
        return None
