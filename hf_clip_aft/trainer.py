"""`AFTTrainer`: adversarial fine-tuning of a CLIP vision tower as a `transformers.Trainer`."""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
)
from transformers.utils import logging as transformers_logging

from .attack import adversarial_perturbation
from .config import AFTConfig
from .data import AFTDataCollator, class_names as dataset_class_names, find_image_column, prepare_dataset
from .loss import fare_loss, mean_cosine_similarity, tecoa_loss
from .modeling import encode_images, frozen_parameters

logger = logging.getLogger(__name__)

Dataset = datasets.Dataset | datasets.IterableDataset


def vision_tower_of(clip: CLIPModel) -> CLIPVisionModelWithProjection:
    """A `CLIPVisionModelWithProjection` holding a copy of `clip`'s vision tower and visual projection."""
    config = copy.deepcopy(clip.config.vision_config)
    config.projection_dim = clip.config.projection_dim
    config._name_or_path = clip.config._name_or_path
    vision = CLIPVisionModelWithProjection(config).to(dtype=clip.dtype)
    state = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    vision.load_state_dict(state, strict=True)
    return vision


def load_vision_tower(name_or_path: str, **kwargs) -> CLIPVisionModelWithProjection:
    """The vision tower and projection of a CLIP checkpoint (a full `CLIPModel` or a vision-only one).

    The text tower's weights are expected to be left over; a missing vision weight is an error, not a warning,
    because it would silently train from a random initialisation.
    """
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the text keys it skips are expected, not news
    try:
        vision, info = CLIPVisionModelWithProjection.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(f"{name_or_path} lacks vision weights {sorted(info['missing_keys'])}: is it a CLIP checkpoint?")
    return vision


def _load_processor(source: str | None, image_size: int) -> ProcessorMixin | CLIPImageProcessor:
    """The checkpoint's processor; a CLIP image processor sized for the model when the checkpoint has none."""
    if source is not None:
        try:
            return AutoProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            logger.warning("No processor could be loaded from %s (%s).", source, err)
    logger.warning("Using CLIP's default image processor (OpenAI mean/std) at %d pixels.", image_size)
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


class AFTTrainer(Trainer):
    """Adversarial fine-tuning of a CLIP image encoder (Gong et al., ICLR 2025), as a `transformers.Trainer`.

    Args:
        model: a Hub id or local path of a CLIP checkpoint, a `CLIPModel`, or a `CLIPVisionModelWithProjection`.
            Only the vision tower and its projection train; the text tower never does.
        args: an :class:`AFTConfig` (defaults to the paper's settings with ``output_dir="<model name>-AFT"``).
        train_dataset: a `datasets` dataset with an image column (PIL images, paths or bytes).
        processing_class: the model's processor (or image processor); loaded from the checkpoint when omitted.
        peft_config: a `peft` LoRA/DoRA config applied to the vision tower. The reference encoder is then the same
            model with its adapters disabled, so no second copy is kept in memory.
        class_names: class names for the TeCoA loss; read from the label column's `ClassLabel` when omitted.
        image_column: the image column; the first `Image` column when omitted.
        label_column: the class-label column (used by the TeCoA loss only).

    Logged metrics besides ``loss``: ``attack_loss`` (‖f(x+δ*) − e0‖², the embedding distance the attack reached),
    ``cos_sim_adv`` and ``cos_sim_clean`` (cosine similarity of the adversarial / clean embedding to e0), and
    ``skipped_images`` (unreadable images skipped so far), all averaged over the logging window and the ranks.
    """

    _tag_names = ["hf_clip_aft", "aft", "adversarial-training"]
    # compute_loss returns a per-batch mean; the Trainer must still divide it by the accumulation steps, whatever
    # it infers from the `labels` key and the model's **kwargs.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: str | CLIPModel | CLIPVisionModelWithProjection,
        args: AFTConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: ProcessorMixin | CLIPImageProcessor | None = None,
        data_collator: Callable | None = None,
        peft_config: Any | None = None,
        class_names: list[str] | None = None,
        image_column: str | None = None,
        label_column: str | None = "label",
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        if isinstance(model, str):
            self.base_model_source: str | CLIPModel | None = model
            vision = load_vision_tower(model)
        elif isinstance(model, CLIPModel):
            self.base_model_source = model
            vision = vision_tower_of(model)
        elif isinstance(model, CLIPVisionModelWithProjection):
            self.base_model_source = model.config._name_or_path or None
            vision = model
        else:
            raise TypeError(
                f"model must be a Hub id, a local path, a CLIPModel or a CLIPVisionModelWithProjection; "
                f"got {type(model).__name__}."
            )
        if args is None:
            name = (self.base_model_source if isinstance(self.base_model_source, str) else "clip") or "clip"
            args = AFTConfig(output_dir=f"{name.rstrip('/').split('/')[-1]}-AFT")
        if not isinstance(args, AFTConfig):
            raise TypeError(f"args must be an AFTConfig, got {type(args).__name__}.")

        source_path = self.base_model_source if isinstance(self.base_model_source, str) else None
        if processing_class is None:
            processing_class = _load_processor(source_path, vision.config.image_size)
        self.image_processor = getattr(processing_class, "image_processor", processing_class)

        if peft_config is not None:
            from peft import get_peft_model

            vision = get_peft_model(vision, peft_config)
            self.ref_model = None
        else:
            self.ref_model = copy.deepcopy(vision).eval().requires_grad_(False)

        self.text_embeds: torch.Tensor | None = None
        if args.loss_type == "tecoa":
            if class_names is None:
                if train_dataset is None:
                    raise ValueError("loss_type='tecoa' needs class names: pass class_names or a labelled train_dataset.")
                class_names = dataset_class_names(train_dataset.features, label_column)
            self.text_embeds = self._class_text_embeds(model, processing_class, class_names, args.prompt_template)

        if train_dataset is not None:
            image_column = find_image_column(train_dataset.features, image_column)
            train_dataset = prepare_dataset(train_dataset, image_column)
        if eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, find_image_column(eval_dataset.features, image_column))
        if data_collator is None:
            data_collator = AFTDataCollator(
                self.image_processor,
                image_column=image_column or "image",
                label_column=label_column if args.loss_type == "tecoa" else None,
            )

        super().__init__(
            model=vision,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        # Per mode ("train" / "eval"), per metric: the values of the micro-batches since the last log.
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._skipped_total = 0

    @staticmethod
    def _class_text_embeds(model, processor, names: list[str], template: str) -> torch.Tensor:
        """L2-normalised text embeddings of one prompt per class, from the frozen text tower."""
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("loss_type='tecoa' needs a processor with a tokenizer (a CLIPProcessor).")
        if isinstance(model, CLIPModel):
            text_model = CLIPTextModelWithProjection(model.config.text_config)
            text_model.text_model.load_state_dict(model.text_model.state_dict())
            text_model.text_projection.load_state_dict(model.text_projection.state_dict())
        else:
            source = model if isinstance(model, str) else model.config._name_or_path
            text_model = CLIPTextModelWithProjection.from_pretrained(source)
        tokens = tokenizer([template.format(name) for name in names], padding=True, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(text_model(**tokens).text_embeds.float(), dim=-1)

    # --- the AFT step ---

    def _forward_model(self, model: nn.Module) -> nn.Module:
        # Under FSDP the unwrapped module only holds shards: the attack must go through the wrapper. Elsewhere it
        # goes through the bare module, so that DDP's reducer only sees the training forward.
        return model if self.is_fsdp_enabled else self.accelerator.unwrap_model(model)

    def _embed(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return encode_images(
            model,
            pixels,
            self.image_processor.image_mean,
            self.image_processor.image_std,
            normalize=self.args.embedding_normalize,
        )

    @torch.no_grad()
    def reference_embeds(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """e0 = f0(x): the frozen original encoder's embeddings (the adapters disabled under peft)."""
        if self.ref_model is not None:
            return self._embed(self.ref_model, pixels)
        with self.accelerator.unwrap_model(model).disable_adapter():
            return self._embed(self._forward_model(model), pixels)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        pixels = inputs["pixel_values"]
        metrics = self._metrics["train" if model.training else "eval"]
        if "num_skipped" in inputs:
            metrics["skipped_images"].append(inputs["num_skipped"].sum())
        target = self.reference_embeds(model, pixels)

        attack_model = self._forward_model(model)
        with frozen_parameters(attack_model):
            adv_pixels = adversarial_perturbation(lambda x: self._embed(attack_model, x), pixels, target, self.args)

        adv_embeds = self._embed(model, adv_pixels)
        attack_loss = fare_loss(adv_embeds, target)
        if self.args.loss_type == "tecoa":
            loss = tecoa_loss(adv_embeds, self.text_embeds.to(adv_embeds.device), inputs["labels"])
        else:
            loss = attack_loss

        w = self.args.clean_weight
        if w > 0:
            clean_embeds = self._embed(model, pixels)
            loss = w * fare_loss(clean_embeds, target) + (1 - w) * loss
            metrics["cos_sim_clean"].append(mean_cosine_similarity(clean_embeds.detach(), target))
        elif not model.training or self._logging_next_step():
            # Only for the log: one forward without graph, on evaluation and on the training steps that get logged.
            with torch.no_grad():
                clean_embeds = self._embed(model, pixels)
            metrics["cos_sim_clean"].append(mean_cosine_similarity(clean_embeds, target))

        metrics["attack_loss"].append(attack_loss.detach())
        metrics["cos_sim_adv"].append(mean_cosine_similarity(adv_embeds.detach(), target))
        return (loss, {"image_embeds": adv_embeds}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation is the AFT loss itself (attack included): there are no labels or logits to predict."""
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _logging_next_step(self) -> bool:
        """Whether the optimiser step in progress will be logged (the flow callback's rule)."""
        step = self.state.global_step + 1
        logging_steps = self.state.logging_steps or 1
        return step % logging_steps == 0 or (step == 1 and self.args.logging_first_step)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = "eval_" if mode == "eval" else ""
        metrics = self._metrics[mode]
        if metrics:
            for key, values in metrics.items():
                if key == "skipped_images":
                    # A running total over the whole run and every rank.
                    self._skipped_total += int(self.accelerator.reduce(torch.stack(values).sum(), "sum").item())
                    logs[prefix + key] = self._skipped_total
                else:
                    logs[prefix + key] = self.accelerator.reduce(torch.stack(values).mean(), "mean").item()
            metrics.clear()
        super().log(logs, start_time)

    # --- saving ---

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the drop-in `CLIPModel` folder (checkpoints during training keep the resumable training state).

        The folder holds the fine-tuned vision tower and projection, the base model's text tower and logit scale,
        and the processor: ``CLIPModel.from_pretrained(output_dir)`` loads it with plain transformers.
        """
        self._exporting = not _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._exporting = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not getattr(self, "_exporting", False):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        from .export import export_clip

        output_dir = output_dir or self.args.output_dir
        trained = self.accelerator.unwrap_model(self.model)
        if state_dict is not None:
            # A sharded engine (FSDP, ZeRO-3) gathered the full weights: load them into a plain copy.
            if not isinstance(trained, CLIPVisionModelWithProjection):
                raise NotImplementedError(
                    "Exporting a peft model trained under FSDP/ZeRO-3 is not supported here: save the adapter "
                    "with save_model(_internal_call=True) and export with recipes/push.py --dry_run."
                )
            full = CLIPVisionModelWithProjection(trained.config)
            full.load_state_dict(state_dict)
            trained = full
        export_clip(trained, self.base_model_source, output_dir, processor=self.processing_class)
