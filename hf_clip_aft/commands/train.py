"""Adversarial fine-tuning of a CLIP image encoder.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train.py recipes/configs/vit-b-16.yaml
    python recipes/train.py recipes/configs/demo.yaml            # offline demo on the CPU
    hf-clip-aft train recipes/configs/vit-b-16.yaml --attack_eps 2 --output_dir out/eps2

A YAML/JSON file gives the defaults; any `--flag` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import torch

from hf_clip_aft import AFTConfig, AFTTrainer
from hf_clip_aft.data import find_image_column, load_image_dataset


@dataclass
class ScriptArguments:
    """What to train on: the model and the dataset."""

    model_name_or_path: str = field(
        default="openai/clip-vit-base-patch16",
        metadata={"help": "Hub id or local path of the CLIP checkpoint to fine-tune."},
    )
    dataset_name: str = field(
        default="ILSVRC/imagenet-1k",
        metadata={"help": "Hub dataset id, or a local folder of images (one sub-folder per class)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, if any."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the dataset instead of downloading it first (requires max_steps)."},
    )
    image_column: str | None = field(
        default=None, metadata={"help": "Image column; the first column of type Image when omitted."}
    )
    label_column: str = field(default="label", metadata={"help": "Class-label column (TeCoA loss only)."})


@dataclass
class ModelArguments:
    """Optional LoRA/DoRA on the vision tower, through `peft`."""

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all vision weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (the adapter's inner width, in channels)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling α (the update is scaled by α/r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the LoRA branch (0-1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        metadata={"help": "Vision-tower modules that get adapters (attention and MLP projections by default)."},
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})

    def peft_config(self):
        """The `peft.LoraConfig` these arguments describe, or None when `use_peft` is off."""
        if not self.use_peft:
            return None
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=self.lora_target_modules,
            use_dora=self.use_dora,
        )


@dataclass
class MonitorArguments:
    """Interpretability measured during training (hf_clip_aft.interpret.monitor), at eval_steps or monitor_steps."""

    monitor_maps: bool = field(
        default=False,
        metadata={
            "help": "Measure map metrics, zero-shot accuracy and collapse signs at step 0 and every evaluation; the "
            "base is a candidate for metric_for_best_model, and the run ends with a verdict."
        },
    )
    monitor_steps: int | None = field(
        default=None,
        metadata={
            "help": "Also measure every this many optimiser steps (no eval_strategy needed); the held-out images "
            "are never attacked."
        },
    )
    monitor_dataset: str | None = field(
        default=None, metadata={"help": "Held-out dataset (Hub id or imagefolder); default: dataset_name."}
    )
    monitor_split: str = field(default="validation", metadata={"help": "Split of the held-out dataset."})
    monitor_mask_column: str | None = field(
        default=None,
        metadata={
            "help": "Object-mask column (localisation metrics); default: an Image column named mask/segmentation."
        },
    )
    monitor_method: str = field(
        default="simple_gradient",
        metadata={
            "help": "Map method (any registered name; clip_surgery needs the checkpoint's tokenizer and text tower)."
        },
    )
    monitor_max_images: int = field(default=64, metadata={"help": "Held-out images measured (the first ones)."})
    monitor_guard_metric: str | None = field(
        default=None,
        metadata={"help": "Metric the guard watches; default energy_pointing_game with masks, else deletion_auc."},
    )
    monitor_guard_tolerance: float = field(
        default=0.02, metadata={"help": "Allowed loss of the guard metric against the base, in its own units."}
    )
    monitor_guard_patience: int = field(default=2, metadata={"help": "Bad evaluations in a row before it warns."})
    monitor_collapse_ratio: float = field(
        default=0.25,
        metadata={"help": "Collapsed when the embedding spread falls below this share of the base's (0: never)."},
    )
    monitor_majority_limit: float = field(
        default=0.5,
        metadata={
            "help": "Collapsed when one class takes more than this share of the zero-shot predictions and twice the "
            "base's (1: never). A collapsed measurement warns, is never the best model and is not exported."
        },
    )
    monitor_stop_after_collapses: int = field(
        default=0,
        metadata={
            "help": "Stop after this many collapsed measurements in a row (0: never stop for collapse; collapsed "
            "weights are never exported either way)."
        },
    )
    stop_if_maps_worse: bool = field(
        default=False, metadata={"help": "Stop training at the first warning (the guard or the collapse check)."}
    )

    def settings(self, batch_size: int):
        """The monitor's :class:`~hf_clip_aft.interpret.monitor.MonitorSettings` (validated there)."""
        from hf_clip_aft.interpret.monitor import MonitorSettings

        return MonitorSettings(
            method=self.monitor_method,
            max_images=self.monitor_max_images,
            batch_size=batch_size,
            guard_metric=self.monitor_guard_metric,
            guard_tolerance=self.monitor_guard_tolerance,
            guard_patience=self.monitor_guard_patience,
            collapse_ratio=self.monitor_collapse_ratio,
            majority_limit=self.monitor_majority_limit,
            stop_after_collapses=self.monitor_stop_after_collapses,
            stop_if_maps_worse=self.stop_if_maps_worse,
        )


def monitor_callback(script_args: ScriptArguments, monitor_args: MonitorArguments, training_args: AFTConfig, held_out):
    """The map monitor on `held_out`, with the base checkpoint as f0, as a callback for the trainer (zero-shot
    accuracy too when `held_out` has class labels and the checkpoint a text tower; the empty prompt's text embedding
    when the map method needs it, e.g. ``clip_surgery``)."""
    from transformers import CLIPModel

    from hf_clip_aft.data import class_names, clip_image_processor, load_processor
    from hf_clip_aft.interpret.batches import find_mask_column
    from hf_clip_aft.interpret.monitor import MapMonitor, MapMonitorCallback, needs_empty_prompt
    from hf_clip_aft.interpret.surgery import empty_prompt_embedding
    from hf_clip_aft.modeling import class_text_embeddings, load_vision_tower

    device = training_args.device
    image_column = find_image_column(held_out.features, script_args.image_column)
    mask_column = find_mask_column(held_out.features, image_column, monitor_args.monitor_mask_column)
    base = load_vision_tower(script_args.model_name_or_path).to(device).eval()
    try:
        processor = load_processor(script_args.model_name_or_path)
    except (OSError, ValueError):  # as the trainer does: CLIP's default processor at the model's size
        processor = clip_image_processor(base.config.image_size)
    label_column, class_embeds, empty_prompt = None, None, None
    labelled = isinstance(held_out.features.get(script_args.label_column), datasets.ClassLabel)
    empty_prompt_needed = needs_empty_prompt(monitor_args.monitor_method)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and (labelled or empty_prompt_needed):
        clip = CLIPModel.from_pretrained(script_args.model_name_or_path).to(device).eval()
        if labelled:
            names = class_names(held_out.features, script_args.label_column)
            class_embeds = class_text_embeddings(clip, tokenizer, names).cpu()
            label_column = script_args.label_column
        if empty_prompt_needed:  # with the class prompts' templates (the default of both)
            empty_prompt = empty_prompt_embedding(clip, tokenizer).cpu()
        del clip
    monitor = MapMonitor.from_dataset(
        base,
        held_out,
        getattr(processor, "image_processor", processor),
        image_column=image_column,
        mask_column=mask_column,
        label_column=label_column,
        class_embeds=class_embeds,
        settings=monitor_args.settings(training_args.per_device_eval_batch_size),
        empty_prompt_embeds=empty_prompt,
    )
    return MapMonitorCallback(monitor, monitor_steps=monitor_args.monitor_steps)


ARGUMENTS = (ScriptArguments, ModelArguments, AFTConfig, MonitorArguments)


def main(
    script_args: ScriptArguments,
    model_args: ModelArguments,
    training_args: AFTConfig,
    monitor_args: MonitorArguments | None = None,
) -> None:
    """Fine-tune, save the drop-in `CLIPModel` to ``training_args.output_dir`` and say how to load it."""
    monitor_args = monitor_args or MonitorArguments()
    callbacks = []
    if monitor_args.monitor_maps:
        if training_args.eval_strategy == "no" and monitor_args.monitor_steps is None:
            raise ValueError(
                "monitor_maps=True measures the maps at every evaluation, but eval_strategy='no' and no "
                "monitor_steps: set monitor_steps: N, or eval_strategy: steps and eval_steps: N (e.g. 500)."
            )
        held_out = load_image_dataset(
            monitor_args.monitor_dataset or script_args.dataset_name,
            script_args.dataset_config,
            monitor_args.monitor_split,
        )
        held_out = held_out.select(range(min(len(held_out), monitor_args.monitor_max_images)))
        callbacks.append(monitor_callback(script_args, monitor_args, training_args, held_out))
    dataset = load_image_dataset(
        script_args.dataset_name, script_args.dataset_config, script_args.dataset_split, script_args.streaming
    )
    trainer = AFTTrainer(
        model=script_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset,
        peft_config=model_args.peft_config(),
        image_column=script_args.image_column,
        label_column=script_args.label_column,
        dataset_name=script_args.dataset_name,
        callbacks=callbacks,  # the monitor's images are never an eval_dataset: no attack runs on them
    )
    trainer.train(resume_from_checkpoint=training_args.resume_target())
    trainer.save_model()
    if trainer.is_world_process_zero():
        out = training_args.output_dir
        evaluation = trainer.training_evaluation
        if evaluation and evaluation["improved"]:  # otherwise the monitor has just logged it as a warning
            print(f"\n{evaluation['verdict']}")
        print(f"\nSaved the fine-tuned CLIP to {out}. Load it with plain transformers:")
        print(f'    from transformers import CLIPModel\n    model = CLIPModel.from_pretrained("{out}")')
    # Every rank waits for the others, then leaves the process group: a rank that exits while another still talks
    # to it can abort at exit ("terminate called without an active exception", seen with two-process FSDP).
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
