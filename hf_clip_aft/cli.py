"""Command-line plumbing shared by the recipes: script and model arguments, YAML + CLI parsing."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


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
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling α (the update is scaled by α/r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
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


def parse_args(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse ``[config.yaml] [--key value ...]``: the YAML file sets defaults, command-line flags override them.

    Unknown YAML keys are an error that names them, so a typo cannot silently fall back to a default.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        path = Path(argv.pop(0))
        if not path.is_file():
            raise FileNotFoundError(f"Config file {path} does not exist.")
        values = yaml.safe_load(path.read_text()) or {}
        known = {f.name for cls in dataclass_types for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown keys in {path}: {unknown}. Check the spelling against `--help`.")
        parser.set_defaults(**values)
        # Fields without a default must still be given; the YAML value counts as given.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    return parser.parse_args_into_dataclasses(args=argv)
