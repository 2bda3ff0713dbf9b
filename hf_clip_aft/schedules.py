"""Attack schedules: how much inner-maximisation work each training image gets, and where its δ starts.

AFT's attack is K PGD steps per image per visit, 2K of the ~2K + 4 forward-equivalents of a step (K = 10: 24.6,
``benchmarks/RESULTS.md``). The schedules below do less attack work per image; each comes from an adversarial-training
paper, whose authors' code this module follows except where noted:

- ``pgd`` (default): K steps from a random start, :func:`hf_clip_aft.attack.adversarial_perturbation`, bit for bit.
  ``attack_early_stop`` stops a row's ascent once its objective stops rising (it keeps its best δ).
- ``fgsm_rs``: "Fast is better than free" (Wong, Rice & Kolter, ICLR 2020; github.com/locuslab/fast_adversarial):
  one signed step of ``attack_fgsm_step`` · ε (1.25 ε) from a uniform random start, then the projection. The library
  keeps its objective (smoothing noise, norm penalty): FGSM-RS is its PGD with K = 1 and α = 1.25 ε.
- ``free``: "Adversarial training for free!" (Shafahi et al., NeurIPS 2019; github.com/mahyarnajibi/
  FreeAdversarialTraining): every global batch is replayed m = ``attack_replays`` times in a row, each replay one
  ordinary training step whose single backward gives the weight gradient (for the optimiser) and the input gradient
  (for δ ← Π(δ + ``attack_fgsm_step`` · ε · sign g), used by the next replay). No attack forward at all.
- ``carry``: ATTA (Zheng et al., CVPR 2020; github.com/haizhongzheng/ATTA): an example's attack starts from the δ
  it ended with at its previous visit (kept per example index), then takes K steps (ATTA: K = 1 or a few);
  the stored δ are dropped every ``attack_carry_reset_epochs`` epochs (ATTA: 10).

Evaluation (``Trainer.evaluate``) always attacks with plain PGD (K = ``attack_steps`` from a random start), whatever
the schedule, so that evaluations compare across schedules.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Sampler
from transformers import TrainerCallback

from .attack import AttackOutcome, ExampleRandomness, _ascend, _rule, _start, projected_gradient_ascent
from .files import atomic_write
from .modeling import EmbedFn

logger = logging.getLogger(__name__)

ATTACK_SCHEDULES = ("pgd", "fgsm_rs", "free", "carry")
# attack_fgsm_step when None: the papers' steps, in units of ε.
DEFAULT_FGSM_STEP = {"fgsm_rs": 1.25, "free": 1.0}  # Wong et al. 2020 (1.25 ε); Shafahi et al. 2019 (ε)
# The file of the per-example perturbations in a checkpoint folder (safetensors: no pickle on load).
STATE_FILE = "attack_perturbations.safetensors"

# Work counted in forward-equivalents (one forward of one image = 1), the FLOP model of benchmarks/aft_step.py: a
# backward to the input only (the attack's, weights frozen) costs about one forward, a backward to the weights and the
# input about two. FlopCounterMode measures 2K + 4.6 on ViT-B/16 where this counts 2K + 4: attention's backward costs
# 2.5 times its forward (benchmarks/RESULTS.md).
ATTACK_STEP_COST = 2.0  # forward + backward to δ
TRAINING_STEP_COST = 3.0  # forward + backward to the weights (and, for free, to the input in the same pass)
REFERENCE_COST = 1.0  # e0 = f0(x), unless precomputed


def fgsm_step(config: Any) -> float:
    """The step of ``fgsm_rs`` and ``free`` in units of 1/255: ``attack_fgsm_step`` (or the paper's) times ε."""
    ratio = getattr(config, "attack_fgsm_step", None)
    if ratio is None:
        ratio = DEFAULT_FGSM_STEP.get(config.attack_schedule, 1.0)
    return ratio * config.attack_eps


class _Settings:
    """`config` with some attributes replaced (the schedules' view of the attack settings)."""

    def __init__(self, config: Any, **overrides: Any):
        self._config, self._overrides = config, overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._config, name)


def step_cost(attack_steps: torch.Tensor, reference: bool, clean_forward: bool) -> float:
    """Forward-equivalents per image of one training step: the reference forward (when computed), the attack
    (`attack_steps` ``(B,)``: steps each row took) and the training forward and backward (twice with a clean loss)."""
    attack = ATTACK_STEP_COST * attack_steps.double().mean().item() if len(attack_steps) else 0.0
    return REFERENCE_COST * reference + attack + TRAINING_STEP_COST * (1 + clean_forward)


def reset_epoch(epoch: int, period: int | None) -> int:
    """The first epoch (0-based) whose stored δ are still valid at `epoch`: ATTA drops them at the start of every
    epoch whose 1-based number is a multiple of `period` (``train_atta_cifar.py``: ``epoch % epochs_reset == 0``)."""
    if not period:
        return 0
    return (epoch + 1) // period * period - 1 if (epoch + 1) >= period else 0


class PerturbationTable:
    """Each example's last δ, by example index: ``index -> (epoch stored, uses, δ)``, δ in float16 on the host.

    float16 halves the memory (294 KiB per 224-px image) and changes a δ of ε = 4/255 by at most 2⁻¹¹ of its size.
    """

    def __init__(self) -> None:
        self.rows: dict[int, tuple[int, int, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, indices: list[int], like: torch.Tensor, since_epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """δ for each index stored at `since_epoch` or later (zeros elsewhere), shaped and placed like `like`, and
        ``(B,)`` whether it was found."""
        start = torch.zeros_like(like)
        found = torch.zeros(len(indices), dtype=torch.bool)
        for row, index in enumerate(indices):
            entry = self.rows.get(index)
            if entry is not None and entry[0] >= since_epoch:
                start[row] = entry[2].to(like)
                found[row] = True
        return start, found

    def uses(self, indices: list[int]) -> list[int]:
        return [self.rows[i][1] if i in self.rows else 0 for i in indices]

    def store(self, indices: list[int], deltas: torch.Tensor, epoch: int, uses: list[int] | None = None) -> None:
        deltas = deltas.detach().to("cpu", torch.float16)
        for row, index in enumerate(indices):
            self.rows[index] = (epoch, uses[row] if uses else 1, deltas[row].clone())

    def drop(self, indices: list[int]) -> None:
        for index in indices:
            self.rows.pop(index, None)

    def merge(self, other: dict[int, tuple[int, int, torch.Tensor]]) -> None:
        """Take `other`'s entries where they are newer (a later epoch) or absent here."""
        for index, entry in other.items():
            mine = self.rows.get(index)
            if mine is None or entry[0] >= mine[0]:
                self.rows[index] = entry

    def tensors(self) -> dict[str, torch.Tensor]:
        indices = sorted(self.rows)
        if not indices:
            return {"indices": torch.zeros(0, dtype=torch.int64)}
        return {
            "indices": torch.tensor(indices, dtype=torch.int64),
            "epochs": torch.tensor([self.rows[i][0] for i in indices], dtype=torch.int64),
            "uses": torch.tensor([self.rows[i][1] for i in indices], dtype=torch.int64),
            "deltas": torch.stack([self.rows[i][2] for i in indices]),
        }

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.rows = {}
        if not len(tensors["indices"]):
            return
        for index, epoch, uses, delta in zip(
            tensors["indices"].tolist(), tensors["epochs"].tolist(), tensors["uses"].tolist(), tensors["deltas"]
        ):
            self.rows[index] = (epoch, uses, delta.clone())


class ReplaySampler(Sampler[int]):
    """Indices of a shuffled (or sequential) epoch in groups of `group` (one optimiser step's examples over every
    process and accumulation step), each group yielded `replays` times in a row: ``free``'s minibatch replays.

    With accelerate's batch sharding (batch j to process j mod W), a replay of a group gives each process the very
    batches of the previous replay, so each example's δ stays on its process. Seeded by (seed, epoch): resuming
    mid-epoch replays the same order.
    """

    def __init__(self, size: int, group: int, replays: int, seed: int, shuffle: bool = True):
        self.size, self.group, self.replays, self.seed, self.shuffle = size, group, replays, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size * self.replays

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        for start in range(0, self.size, self.group):
            chunk = order[start : start + self.group]
            for _ in range(self.replays):
                yield from chunk


class AttackSchedule(TrainerCallback):
    """The attack of one `AFTConfig`'s schedule, with its per-example state (``free``, ``carry``).

    :class:`~hf_clip_aft.AFTTrainer` calls :meth:`perturb` in every step, registers this object as a callback (epoch
    ends), and saves / restores its table with every checkpoint (:meth:`save`, :meth:`load`).

    Args:
        config: an `AFTConfig` (or any object with its attack fields).
        gather: all-gathers a picklable object over the processes (``accelerate.utils.gather_object``); None for one
            process. ``carry`` merges the tables of every process at each epoch end and checkpoint, because the
            sampler deals an example to another process next epoch.
    """

    def __init__(self, config: Any, gather=None):
        self.config = config
        self.schedule = getattr(config, "attack_schedule", "pgd")
        self.gather = gather
        self.table = PerturbationTable()

    @property
    def stateful(self) -> bool:
        return self.schedule in ("free", "carry")

    def perturb(
        self,
        embed_fn: EmbedFn,
        pixels: torch.Tensor,
        target_embeds: torch.Tensor,
        randomness: ExampleRandomness | None,
        training: bool,
    ) -> AttackOutcome:
        """The adversarial pixels of a batch and the attack steps each row took.

        `embed_fn` runs the encoder with frozen weights (the caller's business). In training, ``free`` returns
        pixels that require grad, with a hook that takes the next δ from the training backward's input gradient.
        Outside training (evaluation) every schedule attacks with plain PGD.
        """
        config = self.config
        if not training or self.schedule == "pgd":
            early = training and getattr(config, "attack_early_stop", False)
            return projected_gradient_ascent(embed_fn, pixels, target_embeds, config, randomness, early_stop=early)
        if self.schedule == "fgsm_rs":
            settings = _Settings(config, attack_steps=1, attack_step_size=fgsm_step(config))
            return projected_gradient_ascent(embed_fn, pixels, target_embeds, settings, randomness)
        if randomness is None:
            raise ValueError(
                f"attack_schedule={self.schedule!r} keeps a perturbation per example and needs each batch's "
                "example_index: use the default AFTDataCollator (or pass example_index through a custom collator)."
            )
        indices = [int(i) for i in randomness.indices]
        if self.schedule == "carry":
            since = reset_epoch(randomness.epoch, getattr(config, "attack_carry_reset_epochs", None))
            start, found = self.table.lookup(indices, pixels, since)
            outcome = projected_gradient_ascent(
                embed_fn,
                pixels,
                target_embeds,
                config,
                randomness,
                start=start,
                carried=found,
                early_stop=getattr(config, "attack_early_stop", False),
            )
            self.table.store(indices, outcome.pixels - pixels, randomness.epoch)
            return outcome
        return self._free_replay(pixels, randomness, indices)

    def _free_replay(self, pixels: torch.Tensor, randomness: ExampleRandomness, indices: list[int]) -> AttackOutcome:
        config = self.config
        pixels = pixels.detach()
        # Each replay steps δ once by attack_fgsm_step · ε along N(g), without momentum (Shafahi et al.).
        rule = dataclasses.replace(_rule(config, pixels), alpha=fgsm_step(config) / 255, momentum=0.0)
        # First replay: the library's random start (Shafahi et al. carry one buffer across minibatches instead; a
        # per-example start keeps a run independent of batch composition and process count).
        start, found = self.table.lookup(indices, pixels)
        delta = _start(pixels, config, rule, randomness, start, found)
        uses = self.table.uses(indices)
        adv = (pixels + delta).requires_grad_(True)

        def next_delta(grad: torch.Tensor) -> None:
            # Called by the training backward: δ ← Π(δ + step · N(g)), kept for the next replay of these examples.
            # A non-finite gradient (an fp16 overflow step, which the optimiser skips too) moves nothing.
            with torch.no_grad():
                finite = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
                new, _ = _ascend(delta, finite, torch.zeros_like(delta), pixels, rule)
            done = [index for index, used in zip(indices, uses) if used + 1 >= config.attack_replays]
            self.table.store(indices, new, randomness.epoch, [used + 1 for used in uses])
            self.table.drop(done)

        adv.register_hook(next_delta)
        return AttackOutcome(adv, torch.zeros(len(pixels), dtype=torch.int64))

    # --- the table across processes, epochs and checkpoints ---

    def _synchronise(self) -> None:
        if self.schedule != "carry" or self.gather is None:
            return
        for rows in self.gather([self.table.rows]):
            self.table.merge(rows)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.schedule == "free":
            self.table.rows.clear()  # a replay group never spans two epochs
        self._synchronise()

    def save(self, folder: str | os.PathLike, write: bool) -> None:
        """Write the table into the checkpoint `folder` (atomically; only where `write`, the main process). A
        collective under ``carry`` with several processes: call it on every process."""
        if not self.stateful:
            return
        self._synchronise()
        if write:
            tensors = self.table.tensors()
            atomic_write(os.path.join(folder, STATE_FILE), lambda path: save_file(tensors, path))

    def load(self, folder: str | os.PathLike) -> None:
        """Restore the table saved in the checkpoint `folder`; without one, warn and start from random starts."""
        if not self.stateful:
            return
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path):
            logger.warning(
                "attack_schedule=%r, but %s has no %s: the examples' stored perturbations are lost, and their next "
                "attacks start from random starts.",
                self.schedule,
                folder,
                STATE_FILE,
            )
            self.table = PerturbationTable()
            return
        self.table.load_tensors(load_file(path))

    def describe(self, train_size: int | None, image_size: int) -> str | None:
        """A start-up line on the schedule's cost and state, or None for plain PGD."""
        config = self.config
        if self.schedule == "pgd":
            return "attack: PGD with early stopping" if getattr(config, "attack_early_stop", False) else None
        if self.schedule == "fgsm_rs":
            return f"attack: FGSM with a random start, one step of {fgsm_step(config):g}/255 (Wong et al. 2020)"
        if self.schedule == "free":
            return (
                f"attack: free adversarial training (Shafahi et al. 2019), every batch replayed "
                f"{config.attack_replays} times, step {fgsm_step(config):g}/255: an epoch takes "
                f"{config.attack_replays}× the optimiser steps"
            )
        gib = None if train_size is None else train_size * 3 * image_size**2 * 2 / 2**30  # float16
        size = "" if gib is None else f"; up to {gib:.2f} GiB of δ in host memory, on every process"
        return f"attack: {config.attack_steps} steps from each example's last δ (ATTA, Zheng et al. 2020){size}"


def replay_group(per_device_batch: int, accumulation: int, processes: int) -> int:
    """Examples of one optimiser step over every process and accumulation step: what ``free`` replays."""
    return per_device_batch * accumulation * max(1, processes)


def check_schedule_setup(config: Any, train_dataset: Any, custom_collator: bool) -> None:
    """Before any compute: what the schedule needs from the trainer's data.

    ``free`` and ``carry`` keep a δ per example index, so they need a map-style dataset (a streaming one has no
    stable index and, for ``free``, no sampler to replay); ``free`` replays through its own sampler, which only
    replaces the random and sequential ones. ``carry`` with a custom collator is allowed with a warning: a δ is only
    aligned with its image when the collator's pixels are the same at every visit (no random augmentation).
    """
    schedule = getattr(config, "attack_schedule", "pgd")
    if schedule not in ("free", "carry"):
        return
    if train_dataset is not None and not hasattr(train_dataset, "__len__"):
        raise ValueError(
            f"attack_schedule={schedule!r} keeps a perturbation per example and needs a map-style train_dataset, "
            "not a streaming one: load the dataset without streaming, or use attack_schedule='pgd' or 'fgsm_rs'."
        )
    strategy = getattr(config, "train_sampling_strategy", "random")
    if schedule == "free" and strategy not in ("random", "sequential"):
        raise ValueError(
            f"attack_schedule='free' replays batches through its own sampler, which replaces the 'random' and "
            f"'sequential' ones only; train_sampling_strategy={strategy!r} is not supported with it."
        )
    if schedule == "carry" and custom_collator:
        logger.warning(
            "attack_schedule='carry' with a custom data_collator: a stored δ starts the next attack pixel for pixel, "
            "which is only right if the collator gives the same pixels at every visit (no random augmentation)."
        )


def train_sampler(schedule: str, sampler: Sampler | None, size: int, config: Any) -> Sampler | None:
    """The trainer's train sampler: `sampler` itself, except under ``free``, where a :class:`ReplaySampler` over the
    same order kind (shuffled unless `sampler` is sequential) replays every global batch."""
    if schedule != "free" or sampler is None:
        return sampler
    group = replay_group(config.per_device_train_batch_size, config.gradient_accumulation_steps, config.world_size)
    seed = config.data_seed if config.data_seed is not None else config.seed
    shuffle = not isinstance(sampler, torch.utils.data.SequentialSampler)
    return ReplaySampler(size, group, config.attack_replays, seed, shuffle)
