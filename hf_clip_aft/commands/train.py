"""Adversarial fine-tuning of a CLIP image encoder.

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train.py recipes/configs/vit-b-16.yaml
    python recipes/train.py recipes/configs/demo.yaml            # offline demo on the CPU
    hf-clip-aft train recipes/configs/vit-b-16.yaml --attack_eps 2 --output_dir out/eps2

A YAML/JSON file gives the defaults; any `--flag` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_clip_aft import AFTConfig, AFTTrainer
from hf_clip_aft.data import load_image_dataset


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


ARGUMENTS = (ScriptArguments, ModelArguments, AFTConfig)


def main(script_args: ScriptArguments, model_args: ModelArguments, training_args: AFTConfig) -> None:
    """Fine-tune, save the drop-in `CLIPModel` to ``training_args.output_dir`` and say how to load it."""
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
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if trainer.is_world_process_zero():
        out = training_args.output_dir
        print(f"\nSaved the fine-tuned CLIP to {out}. Load it with plain transformers:")
        print(f'    from transformers import CLIPModel\n    model = CLIPModel.from_pretrained("{out}")')
