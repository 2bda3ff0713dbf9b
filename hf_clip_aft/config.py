"""`AFTConfig`: every knob of adversarial fine-tuning, on top of `transformers.TrainingArguments`."""

from __future__ import annotations

import enum
import functools
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn
from transformers import TrainingArguments

from .attack import ATTACK_NORMS, ELASTIC_RULES, check_group_size
from .loss import LOSS_TYPES
from .schedules import ATTACK_SCHEDULES

logger = logging.getLogger(__name__)

PRESETS = ("paper", "official")
# Settings under which a run is not adversarial fine-tuning: refused unless `allow_no_op`, and named on the card.
NO_OP_SETTINGS = {
    "attack_eps": "no attack, ε = 0",
    "attack_steps": "no attack, K = 0",
    "learning_rate": "no weight update",
}
# What the official training code (github.com/peterant330/CLIP_AFT) runs, as AFTConfig values: the README's training
# command where it passes a flag, the code itself elsewhere. docs/official_parity.md gives the file and line of each,
# and recipes/configs/official-*.yaml set them all. The global batch (README: 128) is not a single field.
OFFICIAL_SETTINGS = {
    "attack_norm": "huber",
    "attack_eps": 1.0,  # README --eps 1 (argparse default 4)
    "attack_eta": 1.0,  # README --eps2 1 (argparse default 4)
    "attack_step_size": 1.0,
    "attack_steps": 10,
    "noise_sigma": 1.0,  # hard-coded randn / 255
    "attack_momentum": 0.9,
    "elastic_rule": "official",
    "clamp_random_start": False,
    "loss_type": "fare",
    "clean_weight": 0.0,
    "embedding_normalize": True,  # README --output_normalize True (argparse default False)
    "prompt_template": "This is a photo of a {}",
    "learning_rate": 1e-5,
    "weight_decay": 1e-4,
    "weight_decay_all_parameters": True,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 0.0,  # no gradient clipping
    "lr_scheduler_type": "cosine",
    "warmup_steps": 1400,  # README --warmup 1400 (argparse default 14000)
    "max_steps": 20000,
    "bf16": False,  # fp32: no autocast anywhere
    "fp16": False,
    "seed": 0,
    "dataloader_drop_last": True,
    "preset": "official",
}
# The official code always runs K PGD steps from a random start: any other schedule differs from it too.
OFFICIAL_ATTACK_SCHEDULE = {"attack_schedule": "pgd", "attack_early_stop": False}


@dataclass
class AFTConfig(TrainingArguments):
    r"""Configuration of an AFT run: the attack, the loss and the paper's optimiser defaults.

    Perturbation budgets (``attack_eps``, ``attack_step_size``, ``attack_eta``, ``noise_sigma``) are **in units of
    1/255** of the pixel range [0, 1]: ``attack_eps=4`` is the paper's ε = 4/255. Defaults are the paper's
    ViT-B/16 settings (Gong et al., ICLR 2025): ε = 4/255, α = 1/255, K = 10, η = σ = 1/255, huber penalty, FARE
    loss, AdamW β = (0.9, 0.95), peak learning rate 1e-5, weight decay 1e-4, cosine schedule with linear warm-up
    over 7% of the steps (1400 of 20000 in the reference runs), 2 epochs. The paper's global batch is 128 (64 for
    ViT-L/14): set ``per_device_train_batch_size × gradient_accumulation_steps × GPUs`` accordingly.

    The official training code differs from the paper's text in places; :data:`OFFICIAL_SETTINGS` (set by
    ``recipes/configs/official-*.yaml``) reproduces it, and ``docs/official_parity.md`` lists every difference.
    """

    # --- inner maximisation (the attack) ---
    attack_eps: float = field(
        default=4.0,
        metadata={"help": "Attack radius ε in units of 1/255 (paper: 4, i.e. 4/255). 0 (no attack) needs allow_no_op."},
    )
    attack_step_size: float = field(
        default=1.0, metadata={"help": "PGD step size α in units of 1/255 (paper: 1, i.e. 1/255)."}
    )
    attack_steps: int = field(
        default=10, metadata={"help": "Number of PGD steps K (paper: 10). 0 (no attack) needs allow_no_op."}
    )
    attack_norm: str = field(
        default="huber",
        metadata={
            "help": "Budget on δ: 'huber' (paper: box [-ε, ε] plus the penalty (η/ε)·mean‖δ_pixel‖₂), 'linf' "
            "(box only), 'l2' (L2 ball of radius ε per image) or 'elastic' (penalty (1/(4η))·Σ(|δ|−ε)₊², no box).",
            "choices": list(ATTACK_NORMS),
        },
    )
    attack_eta: float = field(
        default=1.0,
        metadata={"help": "Penalty scale η of the huber and elastic norms, in units of 1/255 (paper: 1, i.e. 1/255)."},
    )
    attack_group_size: int | None = field(
        default=None,
        metadata={
            "help": "Side in pixels of the square blocks of the 'group' norm (official code only): δ is kept in an "
            "L2 ball of radius ε per block and colour channel, and steps are normalised per block. Must divide the "
            "image size. Default: the model's patch size, filled in by AFTTrainer (the official code hard-codes "
            "14 px at 224 px, whatever the model)."
        },
    )
    elastic_rule: str = field(
        default="library",
        metadata={
            "help": "Update of the 'elastic' norm. 'library': sign steps, penalty (1/(4η))·Σ(|δ|−ε)₊² on the "
            "elements outside the box. 'official' (train/pgd_train.py): steps along the per-image L2-normalised "
            "gradient with momentum, penalty (1/(4η))·Σ(|δ|−ε)² on every element, inside the box too.",
            "choices": list(ELASTIC_RULES),
        },
    )
    attack_momentum: float | None = field(
        default=None,
        metadata={
            "help": "PGD momentum μ in [0, 1): v ← N(μ·v + N(g)), δ ← δ + α·v, N the norm's step normalisation "
            "(the official order). Default None: 0.9 for 'group' and the official elastic rule (they exist only "
            "in the official code, which always uses 0.9), 0 (plain PGD, the paper's text) otherwise. With sign "
            "steps (huber, linf) μ changes a step only where the gradient is exactly 0."
        },
    )
    clamp_random_start: bool = field(
        default=True,
        metadata={
            "help": "Project the random start δ₀ ~ U(−ε, ε) into the budget and x + δ₀ into [0, 1] before the first "
            "forward (library: True). False uses δ₀ as drawn, as the official code does."
        },
    )
    noise_sigma: float = field(
        default=1.0,
        metadata={
            "help": "Std σ of the Gaussian noise added to the clean image at every attack step (randomised smoothing), "
            "in units of 1/255 (paper: 1, i.e. 1/255). 0 turns smoothing off."
        },
    )
    # --- attack schedule: how much attack work each image gets (hf_clip_aft/schedules.py) ---
    attack_schedule: str = field(
        default="pgd",
        metadata={
            "help": "'pgd' (paper): attack_steps PGD steps from a random start at every visit. 'fgsm_rs' (Wong et "
            "al. 2020): one step of attack_fgsm_step·ε from a random start. 'free' (Shafahi et al. 2019): every "
            "global batch replayed attack_replays times, one training backward giving the weight gradient and the "
            "next δ (an epoch takes attack_replays× the optimiser steps). 'carry' (ATTA, Zheng et al. 2020): "
            "attack_steps steps from the δ the example ended with at its previous visit. Evaluation always uses "
            "'pgd'.",
            "choices": list(ATTACK_SCHEDULES),
        },
    )
    attack_early_stop: bool = field(
        default=False,
        metadata={
            "help": "With 'pgd' or 'carry': stop an example's ascent at the first step where its objective does not "
            "rise, keeping its best δ; the steps saved are not computed (logged as forward_equivalents)."
        },
    )
    attack_fgsm_step: float | None = field(
        default=None,
        metadata={
            "help": "Step of 'fgsm_rs' and 'free' as a multiple of ε. Default None: 1.25 for 'fgsm_rs' (Wong et al.), "
            "1.0 for 'free' (Shafahi et al.)."
        },
    )
    attack_replays: int = field(
        default=4,
        metadata={
            "help": "'free' only: replays m of every global batch (Shafahi et al.: 4 on ImageNet). Every image is "
            "then trained on m times per epoch: divide num_train_epochs by m to keep the optimiser steps of a "
            "plain run (the paper's choice)."
        },
    )
    attack_carry_reset_epochs: int | None = field(
        default=10,
        metadata={
            "help": "'carry' only: drop the stored δ at the start of every epoch whose 1-based number is a multiple "
            "of this (ATTA: 10); None never drops them."
        },
    )
    # --- outer minimisation (the loss) ---
    loss_type: str = field(
        default="fare",
        metadata={
            "help": "'fare' (paper): ‖f(x+δ*) − e0‖² to the frozen encoder's embedding; 'tecoa': cross-entropy of "
            "zero-shot logits against class labels (needs a ClassLabel column).",
            "choices": list(LOSS_TYPES),
        },
    )
    clean_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight w in [0, 1] of the clean loss: w·‖f(x) − e0‖² + (1 − w)·adversarial loss (paper: 0; the "
            "clean forward is skipped when 0)."
        },
    )
    embedding_normalize: bool = field(
        default=True, metadata={"help": "L2-normalise embeddings before the distances (paper: True)."}
    )
    prompt_template: str = field(
        default="This is a photo of a {}",
        metadata={"help": "Class prompt of the TeCoA loss; '{}' is replaced by the class name."},
    )
    # --- performance ---
    precompute_ref_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference embeddings e0 of the whole train set once before training (one forward "
            "per image, kept on the host: N × D float32) instead of one reference forward per image per step. Valid "
            "because the default collator's pixels are deterministic (resize + centre crop); refused for streaming "
            "datasets and custom collators."
        },
    )

    # --- TrainingArguments whose defaults the paper sets ---
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW (paper: 1e-5)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (paper: 1e-4)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW β₂ (paper: 0.95; official code: 0.999)."})
    weight_decay_all_parameters: bool = field(
        default=False,
        metadata={
            "help": "Apply weight decay to every parameter, as the official code's AdamW does. False (library): "
            "the Trainer's rule, no decay on biases and LayerNorm weights."
        },
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(
        default=0.07,
        metadata={"help": "Linear warm-up: steps if ≥ 1, else a fraction of all steps (paper: 1400 of 20000 = 0.07)."},
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the training set (paper: 2)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimiser steps."})
    preset: str = field(
        default="paper",
        metadata={
            "help": "Which settings this run means to follow, recorded with the run: 'paper' (the paper's text, "
            "the defaults) or 'official' (the official code, recipes/configs/official-*.yaml); with 'official', "
            "every setting that differs from the official code's is named in a warning at start-up.",
            "choices": list(PRESETS),
        },
    )
    allow_no_op: bool = field(
        default=False,
        metadata={
            "help": "Allow attack_eps=0, attack_steps=0 or learning_rate=0, under which the run is not adversarial "
            "fine-tuning (e.g. a clean control); the model card then says so. Refused without this flag."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Write into an output_dir that holds files this library did not write (they may be replaced). "
            "Without it such a folder is refused; an empty one, or one of this library's runs, is always fine."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Resume training from this checkpoint-N folder, or 'true' for the latest complete checkpoint in "
            "output_dir (the train command passes it to Trainer.train)."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the AFT collator reads the image column that Trainer would drop."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.resume_from_checkpoint, bool):  # `resume_from_checkpoint: true` in a YAML file
            self.resume_from_checkpoint = "true" if self.resume_from_checkpoint else None
        check_field_types(self)
        for name in (f.name for f in fields(self) if f.name.endswith("_token")):
            if getattr(self, name):
                # Never echo the value: this message may end up in a log.
                raise ValueError(
                    f"{name} is refused: the training arguments are pickled into every checkpoint "
                    "(training_args.bin, uploaded with hub_strategy='checkpoint'), so a token there would be "
                    "written to disk. Log in with `hf auth login`, or set the HF_TOKEN environment variable."
                )
        no_ops = no_op_reasons(vars(self))
        if no_ops and not self.allow_no_op:
            raise ValueError(
                f"{'; '.join(no_ops)}: this run would not be adversarial fine-tuning, and its model would be "
                "carded as AFT. Use positive values (paper: attack_eps=4, attack_steps=10, learning_rate=1e-5), or "
                "set allow_no_op=True for a deliberate control run (its card then says it is not AFT)."
            )
        checks = [
            ("attack_eps", self.attack_eps, 0 <= self.attack_eps <= 255, "in [0, 255] (units of 1/255; paper: 4)"),
            ("attack_step_size", self.attack_step_size, self.attack_step_size > 0, "> 0 (units of 1/255; paper: 1)"),
            ("attack_steps", self.attack_steps, self.attack_steps >= 0, "≥ 0 (paper: 10)"),
            ("learning_rate", self.learning_rate, self.learning_rate >= 0, "≥ 0 (paper: 1e-5)"),
            ("noise_sigma", self.noise_sigma, self.noise_sigma >= 0, "≥ 0 (units of 1/255; paper: 1)"),
            ("attack_norm", self.attack_norm, self.attack_norm in ATTACK_NORMS, f"one of {ATTACK_NORMS}"),
            (
                "attack_group_size",
                self.attack_group_size,
                self.attack_group_size is None or self.attack_group_size >= 1,
                "a positive number of pixels dividing the image size, or None for the model's patch size",
            ),
            ("elastic_rule", self.elastic_rule, self.elastic_rule in ELASTIC_RULES, f"one of {ELASTIC_RULES}"),
            (
                "attack_momentum",
                self.attack_momentum,
                self.attack_momentum is None or 0 <= self.attack_momentum < 1,
                "in [0, 1) (official code: 0.9), or None for the rule's own default",
            ),
            ("preset", self.preset, self.preset in PRESETS, f"one of {PRESETS}"),
            (
                "attack_schedule",
                self.attack_schedule,
                self.attack_schedule in ATTACK_SCHEDULES,
                f"one of {ATTACK_SCHEDULES}",
            ),
            (
                "attack_fgsm_step",
                self.attack_fgsm_step,
                self.attack_fgsm_step is None or self.attack_fgsm_step > 0,
                "> 0 (a multiple of ε; Wong et al.: 1.25), or None for the schedule's paper value",
            ),
            ("attack_replays", self.attack_replays, self.attack_replays >= 1, "≥ 1 (Shafahi et al.: 4)"),
            (
                "attack_carry_reset_epochs",
                self.attack_carry_reset_epochs,
                self.attack_carry_reset_epochs is None or self.attack_carry_reset_epochs >= 1,
                "≥ 1 epochs (ATTA: 10), or None to keep the stored δ for the whole run",
            ),
            (
                "attack_early_stop",
                self.attack_early_stop,
                not self.attack_early_stop or self.attack_schedule in ("pgd", "carry"),
                "False with attack_schedule 'fgsm_rs' or 'free' (one step per visit: nothing to stop early)",
            ),
            ("loss_type", self.loss_type, self.loss_type in LOSS_TYPES, f"one of {LOSS_TYPES}"),
            ("clean_weight", self.clean_weight, 0 <= self.clean_weight <= 1, "in [0, 1] (paper: 0)"),
            ("prompt_template", self.prompt_template, "{}" in self.prompt_template, "a string containing '{}'"),
            (
                "remove_unused_columns",
                self.remove_unused_columns,
                not self.remove_unused_columns,
                "False: the AFT collator needs the image column",
            ),
        ]
        if self.attack_norm in ("huber", "elastic"):
            checks.append(("attack_eta", self.attack_eta, self.attack_eta > 0, "> 0 (units of 1/255; paper: 1)"))
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid: it must be {allowed}.")
        if self.attack_schedule == "pgd" and self.attack_steps * self.attack_step_size < self.attack_eps:
            logger.warning(
                "attack_steps × attack_step_size = %s/255 < attack_eps = %s/255: the attack cannot reach the edge "
                "of its budget from the centre.",
                self.attack_steps * self.attack_step_size,
                self.attack_eps,
            )
        super().__post_init__()
        if self.preset == "official":
            differing = self.official_differences()
            if differing:
                logger.warning(
                    "preset='official', but these settings differ from the official code's (official value in "
                    "brackets): %s. See docs/official_parity.md.",
                    ", ".join(
                        f"{name}={value!r} [{({**OFFICIAL_SETTINGS, **OFFICIAL_ATTACK_SCHEDULE})[name]!r}]"
                        for name, value in differing.items()
                    ),
                )

    def resume_target(self) -> str | bool | None:
        """What `Trainer.train` takes as ``resume_from_checkpoint``: a folder, True for the latest, or None."""
        return True if str(self.resume_from_checkpoint).lower() == "true" else self.resume_from_checkpoint

    def official_differences(self) -> dict[str, object]:
        """The settings of this run that differ from :data:`OFFICIAL_SETTINGS` (and from the official attack
        schedule, plain PGD), with this run's values."""
        official = {**OFFICIAL_SETTINGS, **OFFICIAL_ATTACK_SCHEDULE}
        values = {name: getattr(self, name) for name in official}
        values = {name: getattr(value, "value", value) for name, value in values.items()}  # enums by their names
        return {name: value for name, value in values.items() if value != official[name]}

    def resolve_group_size(self, patch_size: int, image_size: int) -> None:
        """For ``attack_norm="group"``: fill in ``attack_group_size`` (None → `patch_size`, in pixels) and check
        that it divides `image_size` (pixels), with an error naming both otherwise. Nothing for the other norms."""
        if self.attack_norm != "group":
            return
        if self.attack_group_size is None:
            self.attack_group_size = patch_size
        check_group_size(self.attack_group_size, image_size, image_size)

    def decay_parameter_names(self, model: nn.Module, default: list[str]) -> list[str]:
        """Names of the parameters AdamW decays: every parameter of `model` with ``weight_decay_all_parameters``
        (the official code), else `default` (the Trainer's rule: no decay on biases and LayerNorm weights)."""
        return [name for name, _ in model.named_parameters()] if self.weight_decay_all_parameters else default


def no_op_reasons(settings: Mapping[str, Any]) -> list[str]:
    """Why a run with these settings (an `AFTConfig`'s fields, or a training record's hyperparameters) is not AFT:
    one ``"<field>=0 (<what it means>)"`` per :data:`NO_OP_SETTINGS` entry that is 0; empty for a real AFT run."""
    return [f"{name}=0 ({what})" for name, what in NO_OP_SETTINGS.items() if settings.get(name) == 0]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` has the type `hint` (what a dataclass field's annotation says), as a config value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple)) and all(_fits(item, args[0] if args else Any) for item in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a valid float (`learning_rate: 1`), a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))  # paths given as `Path` objects
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in args)
    if origin in (list, tuple, set):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint))


def check_field_types(config: Any) -> None:
    """Check every field of the dataclass instance `config` against its annotation (`int`, `float`, `str | None`,
    `list[str]`, ...), and raise TypeError naming each field, its value and the expected type otherwise.

    Command-line flags are converted by argparse, but values from a YAML/JSON file arrive as the file typed them
    (``attack_steps: 2.5`` is a float): this is where they are caught, before any compute.
    """
    hints = _type_hints(type(config))
    problems = []
    for f in fields(config):
        value, hint = getattr(config, f.name), hints.get(f.name, Any)
        # HfArgumentParser leaves None in list-typed fields it was not given (e.g. TrainingArguments.debug).
        parser_default = value is None and "list" in str(hint)
        if f.init and not parser_default and not _fits(value, hint):
            problems.append(f"{f.name}={value!r} has type {type(value).__name__}; expected {_describe(hint)}")
    if problems:
        raise TypeError(
            "Invalid setting types (in the config file or on the command line): " + "; ".join(problems) + "."
        )
