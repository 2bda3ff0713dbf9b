"""One seed of the experiment: scenes -> base tower -> fine-tuning variants -> metrics.

Everything is a function of the configuration and the seed: the scenes (training indices ``0 .. train_size − 1``,
evaluation indices from :data:`SPLIT_OFFSETS`), the initialisation, the pre-training batches, the fine-tuning data
order and attack noise, and the evaluation's attack starts. Run with one torch thread, a seed gives the same numbers
on every run on the same machine.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from finetune import VARIANTS, FinetuneSpec, finetune
from measure import SURGERY_METHODS, evaluate_tower
from pretrain import PretrainSpec, TowerSpec, build_tower, class_embeddings, image_processor_for, pretrain
from scenes import CLASS_NAMES, SceneSpec, make_scenes
from tqdm.auto import tqdm

from hf_clip_aft.data import images_to_pixels
from hf_clip_aft.interpret.batches import masks_to_tensor
from hf_clip_aft.interpret.monitor import MapMonitor, MonitorSettings
from hf_clip_aft.modeling import embed_fn

# First scene index of each evaluation split: far beyond any training index, so the splits never overlap.
SPLIT_OFFSETS = {"validation": 1_000_000, "test": 2_000_000}


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole experiment at one size; `variants` are fine-tuned from the same base (see :data:`VARIANTS`)."""

    scenes: SceneSpec = field(default_factory=SceneSpec)
    tower: TowerSpec = field(default_factory=TowerSpec)
    pretrain: PretrainSpec = field(default_factory=PretrainSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    train_size: int = 16000
    eval_size: int = 500
    variants: tuple[str, ...] = VARIANTS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> ExperimentConfig:
        """The configuration :meth:`to_dict` wrote (as read back from JSON); fields added since take their default."""
        specs = {"scenes": SceneSpec, "tower": TowerSpec, "pretrain": PretrainSpec, "finetune": FinetuneSpec}
        parts = {
            name: spec(**{key: tuple(v) if isinstance(v, list) else v for key, v in document[name].items()})
            for name, spec in specs.items()
        }
        sizes = {name: document[name] for name in ("train_size", "eval_size")}
        return cls(**parts, **sizes, variants=tuple(document["variants"]))


@dataclass
class SeedResult:
    """Metrics of every model (``base`` and each variant), fine-tuning logs, timings, and maps for the figure."""

    seed: int
    metrics: dict[str, dict[str, float]]
    pretrain_final_loss: float
    train_logs: dict[str, list[dict[str, float]]]
    same_data_order: bool
    seconds: dict[str, float]
    figure_pixels: torch.Tensor
    figure_labels: list[int]
    figure_masks: torch.Tensor  # (figure_images, H, W) boolean object masks of those scenes
    figure_maps: dict[str, dict[str, torch.Tensor]]  # model -> map method -> (figure_images, H, W)
    training_evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> monitor summary

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the figure tensors)."""
        return {
            "seed": self.seed,
            "metrics": self.metrics,
            "pretrain_final_loss": self.pretrain_final_loss,
            "train_logs": self.train_logs,
            "same_data_order": self.same_data_order,
            "seconds": self.seconds,
            "training_evaluations": self.training_evaluations,
        }


@dataclass
class EvaluationData:
    """One seed's evaluation split and what measuring a tower on it needs.

    Attributes:
        processor: the towers' image processor; class_embeds: ``(C, D)`` the fixed class vectors.
        eval_pixels, eval_masks, eval_labels: the evaluation split as tensors (``(N, 3, H, W)`` in [0, 1],
            ``(N, H, W)`` boolean, ``(N,)``).
    """

    processor: Any
    class_embeds: torch.Tensor
    eval_pixels: torch.Tensor
    eval_masks: torch.Tensor
    eval_labels: torch.Tensor


@dataclass
class World(EvaluationData):
    """One seed's data and base model: what every fine-tuning of that base shares.

    Attributes (besides :class:`EvaluationData`'s):
        train_images: the training scenes (``image`` column only, as the fine-tuning sees them).
        base: the pre-trained tower; pretrain_loss: mean training loss of its last 50 steps (nats).
        seconds: wall time of data generation and pre-training.
    """

    train_images: Any
    base: Any
    pretrain_loss: float
    seconds: dict[str, float]


def evaluation_data(config: ExperimentConfig, seed: int, split: str = "test") -> EvaluationData:
    """The evaluation split `split` (``validation`` or ``test``) of `seed`, without the training scenes or a base."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split={split!r} is not one of {list(SPLIT_OFFSETS)}.")
    processor = image_processor_for(config.scenes.image_size)
    evaluation = make_scenes(seed, config.eval_size, config.scenes, start=SPLIT_OFFSETS[split])
    return EvaluationData(
        processor=processor,
        class_embeds=class_embeddings(len(CLASS_NAMES), config.tower.projection_dim, seed),
        eval_pixels=images_to_pixels(evaluation["image"], processor),
        eval_masks=masks_to_tensor(evaluation["mask"], processor),
        eval_labels=torch.tensor(evaluation["label"]),
    )


def evaluate_model(
    model: Any,
    data: EvaluationData,
    config: ExperimentConfig,
    seed: int,
    figure_images: int = 0,
    surgery_maps: bool = False,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """:func:`measure.evaluate_tower` of `model` on `data`, as every model of a seed is measured: its metrics, and
    its maps of the first `figure_images` scenes (with :data:`measure.SURGERY_METHODS` when `surgery_maps`)."""
    return evaluate_tower(
        model,
        data.processor,
        data.eval_pixels,
        data.eval_masks,
        data.eval_labels,
        data.class_embeds,
        config.finetune.eps,
        seed,
        keep_maps=figure_images,
        dense_methods=SURGERY_METHODS if surgery_maps else (),
    )


def prepare_world(config: ExperimentConfig, seed: int, split: str = "test", base_cache: dict | None = None) -> World:
    """Scenes, evaluation tensors of `split` (``validation`` or ``test``) and the pre-trained base for `seed`.

    `base_cache`, when given, keeps pre-trained bases across calls keyed by what they depend on (the search
    fine-tunes one base many ways).
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    data = evaluation_data(config, seed, split)
    processor, class_embeds = data.processor, data.class_embeds
    train = make_scenes(seed, config.train_size, config.scenes)
    seconds["data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    key = (seed, repr(config.scenes), repr(config.tower), repr(config.pretrain), config.train_size)
    if base_cache is not None and key in base_cache:
        base, pretrain_loss = base_cache[key]
    else:
        base = build_tower(config.tower, seed)
        train_pixels = images_to_pixels(train["image"], processor)
        losses = pretrain(
            base, processor, train_pixels, torch.tensor(train["label"]), class_embeds, config.pretrain, seed
        )
        pretrain_loss = float(np.mean(losses[-50:]))
        if base_cache is not None:
            base_cache[key] = (base, pretrain_loss)
    seconds["pretrain"] = time.perf_counter() - clock
    return World(
        **{name: getattr(data, name) for name in EvaluationData.__dataclass_fields__},
        train_images=train.select_columns(["image"]),
        base=base,
        pretrain_loss=pretrain_loss,
        seconds=seconds,
    )


def validation_monitor(
    world: World, config: ExperimentConfig, seed: int, images: int, settings: MonitorSettings | None = None
) -> MapMonitor:
    """The library's map monitor on the first `images` validation scenes (masks, labels, class vectors), with the
    world's base as f0: what a user would attach to watch the maps while fine-tuning."""
    held_out = make_scenes(seed, images, config.scenes, start=SPLIT_OFFSETS["validation"])
    pixels = images_to_pixels(held_out["image"], world.processor)
    with torch.no_grad():
        reference = embed_fn(world.base, world.processor)(pixels)
    masks = masks_to_tensor(held_out["mask"], world.processor)
    labels = torch.tensor(held_out["label"])
    settings = settings or MonitorSettings(max_images=images)
    return MapMonitor(pixels, world.processor, reference, masks, labels, world.class_embeds, settings)


def run_seed(
    config: ExperimentConfig,
    seed: int,
    split: str = "test",
    figure_images: int = 0,
    base_cache: dict | None = None,
    surgery_maps: bool = False,
    monitor_images: int = 0,
) -> SeedResult:
    """Run the experiment for one seed, evaluating on `split` (``validation`` or ``test``).

    `base_cache`: see :func:`prepare_world`. `surgery_maps`: also measure every model with the training-free
    dense maps of :data:`measure.SURGERY_METHODS`. `monitor_images`: when > 0, every fine-tuning runs with the
    library's map monitor (its defaults) on that many validation scenes, every ``config.finetune.monitor_steps``
    steps; its summaries and verdicts are in ``training_evaluations``.
    """
    world = prepare_world(config, seed, split, base_cache)
    monitor = validation_monitor(world, config, seed, monitor_images) if monitor_images else None
    seconds = dict(world.seconds)
    base = world.base

    def evaluate(model) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        return evaluate_model(model, world, config, seed, figure_images, surgery_maps)

    clock = time.perf_counter()
    metrics, maps, logs, fingerprints, evaluations = {}, {}, {}, {}, {}
    metrics["base"], maps["base"] = evaluate(base)
    seconds["evaluate"] = time.perf_counter() - clock
    for variant in tqdm(config.variants, desc=f"seed {seed}: fine-tuning", leave=False):
        clock = time.perf_counter()
        result = finetune(base, world.processor, world.train_images, variant, config.finetune, seed, monitor=monitor)
        seconds[variant] = time.perf_counter() - clock
        clock = time.perf_counter()
        metrics[variant], maps[variant] = evaluate(result.model)
        seconds["evaluate"] += time.perf_counter() - clock
        logs[variant] = result.log_history
        fingerprints[variant] = result.fingerprints
        if result.training_evaluation:
            evaluations[variant] = result.training_evaluation
    orders = list(fingerprints.values())
    return SeedResult(
        seed=seed,
        metrics=metrics,
        pretrain_final_loss=world.pretrain_loss,
        train_logs=logs,
        same_data_order=all(order == orders[0] for order in orders),
        seconds=seconds,
        figure_pixels=world.eval_pixels[:figure_images],
        figure_labels=world.eval_labels[:figure_images].tolist(),
        figure_masks=world.eval_masks[:figure_images],
        figure_maps=maps,
        training_evaluations=evaluations,
    )
