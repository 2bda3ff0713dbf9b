"""`AFTTrainer`: adversarial fine-tuning of a CLIP vision tower as a `transformers.Trainer`."""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any, ClassVar

import datasets
import torch
from accelerate.utils import gather_object
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    BaseImageProcessor,
    CLIPModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import IntervalStrategy

from .attack import ExampleRandomness
from .config import AFTConfig
from .data import (
    AFTDataCollator,
    check_images_decode,
    clip_image_processor,
    find_image_column,
    load_processor,
    prepare_dataset,
    with_example_index,
)
from .data import (
    class_names as dataset_class_names,
)
from .loss import fare_loss, mean_cosine_similarity, tecoa_loss
from .modeling import (
    class_text_embeddings,
    encode_images,
    eval_mode,
    frozen_parameters,
    load_vision_tower,
    vision_tower_of,
)
from .reference_embeddings import ReferenceEmbedsCollator, precompute_reference_embeddings
from .release.checkpoints import check_output_dir, remove_partial_checkpoints
from .release.hub import check_model_source
from .release.trainer_outputs import HUB_FOLDER, TrainerOutputsMixin
from .schedules import AttackSchedule, check_schedule_setup, step_cost, train_sampler

# HUB_FOLDER (where push_to_hub exports) is re-exported: callers read it from here.
__all__ = ["HUB_FOLDER", "AFTTrainer", "SkippedImages"]

logger = logging.getLogger(__name__)

Dataset = datasets.Dataset | datasets.IterableDataset


def _load_processor(source: str | None, image_size: int) -> ProcessorMixin | BaseImageProcessor:
    """The checkpoint's processor; a CLIP image processor sized for the model when the checkpoint has none."""
    if source is not None:
        try:
            return load_processor(source)
        except (OSError, ValueError) as err:
            logger.warning("No processor could be loaded from %s (%s).", source, err)
    logger.warning("Using CLIP's default image processor (OpenAI mean/std) at %d pixels.", image_size)
    return clip_image_processor(image_size)


class SkippedImages(TrainerCallback, ExportableState):
    """The running total of train images skipped as unreadable. As an `ExportableState` it is saved in every
    checkpoint's ``trainer_state.json``, and `AFTTrainer` restores it on resume, so the total spans the whole run."""

    def __init__(self, total: int = 0):
        self.total = total

    def state(self) -> dict[str, Any]:
        return {"args": {"total": self.total}, "attributes": {}}


class AFTTrainer(TrainerOutputsMixin, Trainer):
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
        dataset_name: the training set's Hub id (or folder), for the model card.

    Logged metrics besides ``loss``: ``attack_loss`` (‖f(x+δ*) − e0‖², the embedding distance the attack reached),
    ``cos_sim_adv`` and ``cos_sim_clean`` (cosine similarity of the adversarial / clean embedding to e0), and
    ``skipped_images`` (unreadable images skipped so far), all averaged over the logging window and the ranks.

    Checkpoints, record, export and Hub push come from :class:`~.release.trainer_outputs.TrainerOutputsMixin`;
    the precomputed reference embeddings from :mod:`hf_clip_aft.reference_embeddings`.
    """

    _tag_names: ClassVar[list[str]] = ["hf_clip_aft", "aft", "adversarial-training"]
    # compute_loss returns a per-batch mean; the Trainer must still divide it by the accumulation steps, whatever
    # it infers from the `labels` key and the model's **kwargs.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: str | CLIPModel | CLIPVisionModelWithProjection,
        args: AFTConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | None = None,
        processing_class: ProcessorMixin | BaseImageProcessor | None = None,
        data_collator: Callable | None = None,
        peft_config: Any | None = None,
        class_names: list[str] | None = None,
        image_column: str | None = None,
        label_column: str | None = "label",
        dataset_name: str | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ):
        self.dataset_name = dataset_name
        # Set by a map monitor (hf_clip_aft.interpret.monitor) when one watches this run; carried into the record.
        self.training_evaluation: dict[str, Any] | None = None
        if isinstance(model, str):
            check_model_source(model)
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
        check_output_dir(args.output_dir, args.overwrite_output_dir)
        args.resolve_group_size(vision.config.patch_size, vision.config.image_size)  # attack_norm="group" only

        source_path = self.base_model_source if isinstance(self.base_model_source, str) else None
        if processing_class is None:
            processing_class = _load_processor(source_path, vision.config.image_size)
        self.image_processor = getattr(processing_class, "image_processor", processing_class)
        tokenizer = getattr(processing_class, "tokenizer", None)
        if tokenizer is not None:
            # Trainer.train copies the tokenizer's special-token ids onto the model's config, with a warning at
            # every run because a vision tower has none; they are set here instead, to the same values.
            special = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
            vision.config.update({name: value for name, value in special.items() if value is not None})

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
                    raise ValueError(
                        "loss_type='tecoa' needs class names: pass class_names or a labelled train_dataset."
                    )
                class_names = dataset_class_names(train_dataset.features, label_column)
            self.text_embeds = self._class_text_embeds(model, processing_class, class_names, args.prompt_template)

        if args.precompute_ref_embeddings and isinstance(train_dataset, datasets.IterableDataset):
            raise ValueError(
                "precompute_ref_embeddings=True needs a map-style train_dataset (it embeds every image once before "
                "training), not a streaming one: load the dataset without streaming, or set "
                "precompute_ref_embeddings=False."
            )
        if args.precompute_ref_embeddings and data_collator is not None:
            raise ValueError(
                "precompute_ref_embeddings=True is only valid with the default AFTDataCollator, whose pixels are "
                "deterministic (resize + centre crop); a custom data_collator may change them from epoch to epoch. "
                "Drop data_collator, or set precompute_ref_embeddings=False."
            )
        check_schedule_setup(args, train_dataset, custom_collator=data_collator is not None)
        if train_dataset is not None:
            image_column = find_image_column(train_dataset.features, image_column)
            train_dataset = with_example_index(prepare_dataset(train_dataset, image_column))
            check_images_decode(train_dataset, image_column)  # a dataset where nothing decodes stops here
        if eval_dataset is not None:
            eval_dataset = prepare_dataset(eval_dataset, find_image_column(eval_dataset.features, image_column))
            eval_dataset = with_example_index(eval_dataset)
        if data_collator is None:
            data_collator = AFTDataCollator(
                self.image_processor,
                image_column=image_column or "image",
                label_column=label_column if args.loss_type == "tecoa" else None,
            )

        # Evaluations without an eval_dataset are allowed when a callback measures on its own images (the map
        # monitor): the Trainer refuses eval_strategy != "no" without one, so it is told "no" while it checks.
        eval_strategy = args.eval_strategy
        if eval_dataset is None and any(getattr(cb, "measures_without_eval_dataset", False) for cb in callbacks or ()):
            args.eval_strategy = IntervalStrategy.NO
        try:
            super().__init__(
                model=vision,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=[*(callbacks or []), SkippedImages()],
                optimizers=optimizers,
            )
        finally:
            args.eval_strategy = eval_strategy
        # Under peft, the adapters' initial values: the base is the model with them (restore_base_weights).
        self._initial_adapters = (
            {k: v.detach().clone() for k, v in vision.named_parameters() if v.requires_grad}
            if peft_config is not None
            else None
        )
        self._skipped = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, SkippedImages))
        # The attack of args.attack_schedule, with its per-example perturbations (free, carry): merged over the
        # processes at epoch ends and checkpoints, saved and restored with the optimiser state.
        self.attack_schedule = AttackSchedule(args, gather_object if self.accelerator.num_processes > 1 else None)
        self.add_callback(self.attack_schedule)
        size = len(self.train_dataset) if isinstance(self.train_dataset, datasets.Dataset) else None
        if description := self.attack_schedule.describe(size, vision.config.image_size):
            logger.info(description)
        if self.args.should_save:
            remove_partial_checkpoints(self.args.output_dir)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not self.is_fsdp_enabled:
            logger.warning(
                "The launch asked for FSDP, but accelerate set up %s: this run is not sharded (accelerate enables FSDP "
                "on GPUs and other accelerators only, never on CPU processes).",
                self.accelerator.distributed_type,
            )
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        elif args.precompute_ref_embeddings and not self.place_model_on_device:
            raise ValueError(
                "precompute_ref_embeddings=True with a peft model needs the model on its device before training, "
                "which FSDP and DeepSpeed postpone: set precompute_ref_embeddings=False."
            )
        # Per mode ("train" / "eval"), per metric: the values of the micro-batches since the last log.
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    @staticmethod
    def _class_text_embeds(model, processor, names: list[str], template: str) -> torch.Tensor:
        """L2-normalised text embeddings of one prompt per class, from the frozen text tower."""
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("loss_type='tecoa' needs a processor with a tokenizer (a CLIPProcessor).")
        if isinstance(model, CLIPModel):
            text_model = model
        else:
            source = model if isinstance(model, str) else model.config._name_or_path
            text_model = CLIPTextModelWithProjection.from_pretrained(source)
        return class_text_embeddings(text_model, tokenizer, names, templates=(template,))

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return self.args.decay_parameter_names(model, super().get_decay_parameter_names(model))

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
        """e0 = f0(x): the frozen original encoder's embeddings (the adapters disabled under peft).

        Computed in the run's mixed precision, like the trained encoder's forward, so that the two agree at
        initialisation (and the reference forward is not an fp32 one in a bf16 run).
        """
        with self.accelerator.autocast():
            if self.ref_model is not None:
                return self._embed(self.ref_model, pixels)
            with eval_mode(model), self.accelerator.unwrap_model(model).disable_adapter():
                return self._embed(self._forward_model(model), pixels)

    def get_train_dataloader(self) -> DataLoader:
        if self.args.precompute_ref_embeddings and not isinstance(self.data_collator, ReferenceEmbedsCollator):
            # e0 of every train image, once; the unreadable ones leave the train set and count as skipped.
            self.train_dataset, self.data_collator, dropped = precompute_reference_embeddings(
                self.train_dataset,
                self.data_collator,
                self.image_processor,
                lambda pixels: self.reference_embeds(self.model, pixels),
                self.accelerator,
                batch_size=self.args.per_device_eval_batch_size,
                num_workers=self.args.dataloader_num_workers,
                show_progress=not self.args.disable_tqdm and self.is_local_process_zero(),
            )
            self._skipped.total += dropped
        return super().get_train_dataloader()

    def _get_train_sampler(self, train_dataset=None):
        # attack_schedule='free' replays every global batch; the other schedules keep the Trainer's sampler.
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        sampler = super()._get_train_sampler(train_dataset)
        return train_sampler(self.args.attack_schedule, sampler, len(dataset) if sampler else 0, self.args)

    def attack_randomness(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> ExampleRandomness | None:
        """Each example's own random start and noise, keyed by (seed, epoch, its dataset index): the same draws for an
        example however the batch is split over processes and accumulation steps. Evaluation always draws epoch 0's,
        so that evaluations compare. None (torch's global generator) for batches without ``example_index`` (a custom
        data collator that does not pass it on).
        """
        if "example_index" not in inputs:
            return None
        epoch = int(self.state.epoch or 0) if model.training else 0
        return ExampleRandomness(self.args.seed, epoch, inputs["example_index"])

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
        if "placeholder" in inputs:
            # Every image of the batch failed to decode (the collator's blank row): a zero loss, through one
            # forward, so that every parameter gets its (zero) gradient and DDP ranks stay in step.
            loss = self._embed(model, pixels).sum() * 0.0
            return (loss, {"image_embeds": None}) if return_outputs else loss
        target = inputs["ref_embeds"] if "ref_embeds" in inputs else self.reference_embeds(model, pixels)

        attack_model = self._forward_model(model)
        training, randomness = model.training, self.attack_randomness(model, inputs)
        # Eval mode as in the official code (train.py:265): dropout must not make δ random.
        with frozen_parameters(attack_model), eval_mode(attack_model):
            attack = self.attack_schedule.perturb(
                lambda x: self._embed(attack_model, x), pixels, target, randomness, training=training
            )
        adv_pixels = attack.pixels
        if model.training:  # the work this step actually did, per image (early stopping shows its saving here)
            cost = step_cost(attack.steps, "ref_embeds" not in inputs, self.args.clean_weight > 0)
            metrics["forward_equivalents"].append(torch.tensor(cost, device=pixels.device))

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
        if model.training and not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"The AFT loss is {loss.item()} at step {self.state.global_step + 1}: the run stops here, so that no "
                "checkpoint holds weights trained on it. Usual causes: a learning rate too high "
                f"(learning_rate={self.args.learning_rate}), fp16 overflow (use bf16 or fp32), or non-finite "
                "weights or pixels. Resume from the last complete checkpoint (resume_from_checkpoint=true) with "
                "the cause fixed."
            )
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
        if mode == "train" and "skipped_images" in metrics:
            logs["skipped_images"] = self._flush_skipped()  # a running total over the whole run and every rank
        for key, values in metrics.items():
            if key == "skipped_images":  # evaluation: the images this evaluation skipped
                logs[prefix + key] = int(self.accelerator.reduce(torch.stack(values).sum(), "sum").item())
            else:
                logs[prefix + key] = self.accelerator.reduce(torch.stack(values).mean(), "mean").item()
        metrics.clear()
        super().log(logs, start_time)

    def _flush_skipped(self) -> int:
        """Add the training skips counted since the last call, over every rank, to the run's total; return it.

        A collective: every rank must call it at the same point (a log, a checkpoint, an export).
        """
        pending = self._metrics["train"].pop("skipped_images", [])
        count = torch.stack(pending).sum() if pending else torch.zeros(())
        self._skipped.total += int(self.accelerator.reduce(count.to(self.args.device), "sum").item())
        return self._skipped.total

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self.attack_schedule.save(output_dir, write=self.args.should_save)  # free/carry: the per-example δ

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.attack_schedule.load(checkpoint)

    def _load_callback_state(self) -> None:
        """On resume: the skipped-images total and every callback with a ``load_checkpoint_state`` method (the map
        monitor) go on from the checkpoint's state, whatever ``restore_callback_states_from_checkpoint`` says
        about the other callbacks (which the Trainer rebuilds from their saved arguments)."""
        saved = self.state.stateful_callbacks.get(SkippedImages.__name__)
        own = {type(cb).__name__: cb for cb in self.callback_handler.callbacks if hasattr(cb, "load_checkpoint_state")}
        kept = {name: self.state.stateful_callbacks.pop(name) for name in own if name in self.state.stateful_callbacks}
        try:
            super()._load_callback_state()  # may replace a callback by a restored copy
        finally:
            self.state.stateful_callbacks.update(kept)
        for name, state in kept.items():
            own[name].load_checkpoint_state(state)
        self._skipped = next(cb for cb in self.callback_handler.callbacks if isinstance(cb, SkippedImages))
        if saved:
            self._skipped.total = int(saved["args"]["total"])

    # --- callbacks that measure the run (the map monitor) ---

    def train(self, *args, **kwargs):
        # Callbacks that need their trainer (the map monitor) bind here, whichever way they were added, and refuse
        # a setup they cannot run in before any step.
        for callback in self.callback_handler.callbacks:
            if hasattr(callback, "bind_trainer"):
                callback.bind_trainer(self)
        return super().train(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """The AFT loss (attack included) on the eval dataset, plus what the callbacks measure. Without an eval
        dataset, only the callbacks that measure on their own images run (the map monitor): no attack."""
        if eval_dataset is None and self.eval_dataset is None:
            if not any(getattr(cb, "measures_without_eval_dataset", False) for cb in self.callback_handler.callbacks):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # the Trainer's error
            metrics: dict[str, float] = {}
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def check_base_restorable(self) -> None:
        """Raise now if :meth:`restore_base_weights` could not run at the end (sharded weights)."""
        if not self.can_restore_base:
            raise NotImplementedError(
                "The map monitor makes the base a candidate for the best model, but restoring the base's weights "
                "under FSDP/DeepSpeed is not supported: set load_best_model_at_end=False (the verdict still says "
                "whether the final model beats the base)."
            )

    def _determine_best_metric(self, metrics: dict[str, float], trial) -> bool:
        # A measurement the map monitor found collapsed never becomes the best model: it cannot beat the base.
        if any(getattr(callback, "last_measurement_collapsed", False) for callback in self.callback_handler.callbacks):
            return False
        return super()._determine_best_metric(metrics, trial)

    @property
    def can_restore_base(self) -> bool:
        """Whether :meth:`restore_base_weights` can run (not under sharded weights)."""
        return not (self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def restore_base_weights(self, reason: str = "no checkpoint scored better than the base") -> None:
        """Put the base's weights back into the trained model (the base scored best, or the final weights
        collapsed: see the map monitor); `reason` goes into the log."""
        self.check_base_restorable()
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            if self.ref_model is not None:
                model.load_state_dict(self.ref_model.state_dict())
            else:
                parameters = dict(model.named_parameters())
                for name, value in self._initial_adapters.items():
                    parameters[name].copy_(value)
        logger.warning("The base's weights were restored: %s.", reason)
