"""`AFTConfig`: every knob of adversarial fine-tuning, on top of `transformers.TrainingArguments`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .attack import ATTACK_NORMS
from .loss import LOSS_TYPES

logger = logging.getLogger(__name__)


@dataclass
class AFTConfig(TrainingArguments):
    r"""Configuration of an AFT run: the attack, the loss and the paper's optimiser defaults.

    Perturbation budgets (``attack_eps``, ``attack_step_size``, ``attack_eta``, ``noise_sigma``) are **in units of
    1/255** of the pixel range [0, 1]: ``attack_eps=4`` is the paper's ε = 4/255. Defaults are the paper's
    ViT-B/16 settings (Gong et al., ICLR 2025): ε = 4/255, α = 1/255, K = 10, η = σ = 1/255, huber penalty, FARE
    loss, AdamW β = (0.9, 0.95), peak learning rate 1e-5, weight decay 1e-4, cosine schedule with linear warm-up
    over 7% of the steps (1400 of 20000 in the reference runs), 2 epochs. The paper's global batch is 128 (64 for
    ViT-L/14): set ``per_device_train_batch_size × gradient_accumulation_steps × GPUs`` accordingly.
    """

    # --- inner maximisation (the attack) ---
    attack_eps: float = field(
        default=4.0,
        metadata={"help": "Attack radius ε in units of 1/255 (paper: 4, i.e. 4/255). 0 disables the attack."},
    )
    attack_step_size: float = field(
        default=1.0, metadata={"help": "PGD step size α in units of 1/255 (paper: 1, i.e. 1/255)."}
    )
    attack_steps: int = field(default=10, metadata={"help": "Number of PGD steps K (paper: 10). 0 disables the attack."})
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
    noise_sigma: float = field(
        default=1.0,
        metadata={
            "help": "Std σ of the Gaussian noise added to the clean image at every attack step (randomised smoothing), "
            "in units of 1/255 (paper: 1, i.e. 1/255). 0 turns smoothing off."
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
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW β₂ (paper: 0.95)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (paper: cosine)."})
    warmup_steps: float = field(
        default=0.07,
        metadata={"help": "Linear warm-up: steps if ≥ 1, else a fraction of all steps (paper: 1400 of 20000 = 0.07)."},
    )
    num_train_epochs: float = field(default=2.0, metadata={"help": "Epochs over the training set (paper: 2)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every this many optimiser steps."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the AFT collator reads the image column that Trainer would drop."},
    )

    def __post_init__(self) -> None:
        checks = [
            ("attack_eps", self.attack_eps, 0 <= self.attack_eps <= 255, "in [0, 255] (units of 1/255; paper: 4)"),
            ("attack_step_size", self.attack_step_size, self.attack_step_size > 0, "> 0 (units of 1/255; paper: 1)"),
            ("attack_steps", self.attack_steps, self.attack_steps >= 0, "≥ 0 (paper: 10)"),
            ("noise_sigma", self.noise_sigma, self.noise_sigma >= 0, "≥ 0 (units of 1/255; paper: 1)"),
            ("attack_norm", self.attack_norm, self.attack_norm in ATTACK_NORMS, f"one of {ATTACK_NORMS}"),
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
        if self.attack_steps * self.attack_step_size < self.attack_eps:
            logger.warning(
                "attack_steps × attack_step_size = %s/255 < attack_eps = %s/255: the attack cannot reach the edge "
                "of its budget from the centre.",
                self.attack_steps * self.attack_step_size,
                self.attack_eps,
            )
        super().__post_init__()
