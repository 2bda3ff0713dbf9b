"""What `AFTTrainer` writes: its atomic checkpoints, the run's training record, the drop-in export with its card, and
the Hub push.

:class:`TrainerOutputsMixin` goes before `transformers.Trainer` in `AFTTrainer`'s bases, because the Trainer itself
calls these methods (``save_model``, ``push_to_hub``, ``_save_checkpoint``). It reads from its host trainer
``base_model_source``, ``dataset_name``, ``training_evaluation``, ``_skipped`` (the skipped-images callback) and
``_flush_skipped`` (a collective that adds every rank's skips to that total).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .card import CardOptions, write_card
from .checkpoints import checkpoint_staging, commit_checkpoint, final_best_checkpoint, push_resumable_checkpoint
from .export import export_clip
from .hub import check_push_access, push_folder
from .names import hub_id
from .record import TrainingRecord, hardware_description

HUB_FOLDER = "_hub"  # under output_dir: the exact folder push_to_hub exports, validates and uploads


class TrainerOutputsMixin:
    """`AFTTrainer`'s checkpoints, record, export and Hub push (see the module docstring for what it needs)."""

    _checkpoint_staging: str | None = None  # the run folder stand-in while a checkpoint is written
    _pending_checkpoint_push = False  # a mid-run push waits until its checkpoint has its final name

    # --- checkpoints: written whole or not at all ---

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """Write ``checkpoint-N`` atomically (:mod:`hf_clip_aft.release.checkpoints`), so that
        ``resume_from_checkpoint=true`` (the highest checkpoint-N) only ever finds complete ones.

        The Trainer writes everything (weights, optimiser, RNG states of every rank, trainer state) into the hidden
        ``.partial-checkpoint-N/checkpoint-N``; the main process then adds the training record, rewrites the trainer
        state with the final ``best_model_checkpoint``, flushes the files to disk and renames the folder to
        ``checkpoint-N`` (then rotates and pushes as the Trainer would). A checkpoint of non-finite weights is
        refused; a failed write (a full disk) leaves no folder behind and says why.
        """
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p.detach()).all()]
        if bad:
            raise FloatingPointError(
                f"Refusing to save checkpoint-{self.state.global_step}: {len(bad)} weight tensors are not finite "
                f"(e.g. {bad[0]}). Resume from the last complete checkpoint with a lower learning_rate."
            )
        self._flush_skipped()  # the total goes into this checkpoint's trainer state
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with checkpoint_staging(run_dir, name, self.args.should_save) as staging:
            self._checkpoint_staging = staging
            try:
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()  # every rank's files (RNG state, shards) are in
                final_best_checkpoint(self.state, staging, run_dir)
                if self.args.should_save:
                    commit_checkpoint(
                        staging, run_dir, name, self.state, self.training_record(), self.args.save_total_limit
                    )
            finally:
                self._checkpoint_staging = None
        if self._pending_checkpoint_push:
            self._pending_checkpoint_push = False
            self._push_from_checkpoint(os.path.join(run_dir, name))
        self.accelerator.wait_for_everyone()

    # --- the record, and the release steps that read it ---

    def training_record(self) -> TrainingRecord:
        """What this run was (:class:`~hf_clip_aft.release.TrainingRecord`), as far as it has gone."""
        runtime = next(
            (log["train_runtime"] for log in reversed(self.state.log_history) if "train_runtime" in log), None
        )
        base = self.base_model_source
        return TrainingRecord.from_config(
            self.args,
            base_model=base if isinstance(base, str) else hub_id(base),
            dataset_name=self.dataset_name,
            train_runtime=runtime,
            hardware=hardware_description(self.args.device, self.args.world_size),
            global_steps=self.state.global_step or None,
            skipped_images=self._skipped.total,
            training_evaluation=self.training_evaluation,
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the drop-in `CLIPModel` folder with its training record and card (and push it with ``push_to_hub``).

        The folder holds the fine-tuned vision tower and projection, the base model's text tower and logit scale,
        the processor, ``training_record.json`` and README.md: ``CLIPModel.from_pretrained(output_dir)`` loads it
        with plain transformers. Checkpoints during training (``_internal_call``) keep the resumable training state.
        """
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        self.export(output_dir or self.args.output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
        return None

    def _trained_tower(self) -> nn.Module:
        """The trained tower, whole. A collective under FSDP / ZeRO-3 (every rank gathers the full weights)."""
        trained = self.accelerator.unwrap_model(self.model)
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return trained
        state_dict = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
        if not isinstance(trained, CLIPVisionModelWithProjection):
            raise NotImplementedError(
                "Exporting a peft model trained under FSDP/ZeRO-3 is not supported here: save the adapter "
                "with save_model(_internal_call=True) and export with recipes/push.py --dry_run."
            )
        full = CLIPVisionModelWithProjection(trained.config)
        if self.args.should_save:  # where the gathered weights are complete
            full.load_state_dict(state_dict)
        return full

    def export(self, folder: str, options: CardOptions | None = None) -> None:
        """The release steps after training: export the drop-in folder with the run's record, then its card.

        Call it on every rank (sharded weights are gathered); only the main process writes.
        """
        trained = self._trained_tower()
        self._flush_skipped()
        if not self.args.should_save:
            return
        record = self.training_record()
        export_clip(trained, self.base_model_source, folder, processor=self.processing_class, record=record)
        write_card(folder, record, options=options or CardOptions(repo_id=self.hub_model_id))

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """With ``push_to_hub``: check at init, not after training, that the token can write to the repo."""
        if not self.is_world_process_zero():
            return
        self.hub_model_id = check_push_access(
            self.args.hub_model_id or Path(self.args.output_dir).absolute().name,
            token=token,
            private=private if private is not None else self.args.hub_private_repo,
        )
        self.push_in_progress = None

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        card_options: CardOptions | None = None,
    ):
        """Push the drop-in `CLIPModel` folder with its record and card, in one commit; never `output_dir` as a whole.

        The folder is exported to ``<output_dir>/_hub`` from the current weights (:meth:`export`), validated, and
        uploaded as is (`PreTrainedModel.push_to_hub` is not used: it would replace our card with its own).
        `card_options`: what the card says beyond the record (:class:`~hf_clip_aft.release.CardOptions`).
        """
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        folder = os.path.join(self.args.output_dir, HUB_FOLDER)
        self.export(folder, card_options or CardOptions(repo_id=self.hub_model_id))
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return push_folder(
            folder,
            self.hub_model_id,
            token=token,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message or "Upload AFT CLIP model",
            run_as_future=not blocking,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Mid-run pushes of the resumable checkpoint, once it has its final name (see
        :func:`~hf_clip_aft.release.checkpoints.push_resumable_checkpoint`). The Trainer's version would copy the
        checkpoint's bare tower over the repo root's CLIPModel."""
        if not self.is_world_process_zero():
            return
        if self._checkpoint_staging is not None:  # called by Trainer._save_checkpoint: push once renamed
            self._pending_checkpoint_push = True
            return
        self.push_in_progress = push_resumable_checkpoint(
            checkpoint_folder,
            self.hub_model_id,
            self.args.hub_strategy,
            self.state.global_step,
            self.push_in_progress,
            revision=self.args.hub_revision,
            always_push=self.args.hub_always_push,
        )
