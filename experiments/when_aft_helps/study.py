"""When does AFT help? Synthetic worlds with dials, AFT and two controls over (learning rate, ε), the guard replayed.

A *world* is one configuration of the laptop-scale experiment (:mod:`experiment` in ``experiments/laptop_scale``):
scenes, tower and pre-training. Its dials move two properties of the base before any fine-tuning:

- how well the base's Simple-Gradient maps localise the object (base energy pointing game): pre-training length,
  clutter that carries the class (:attr:`scenes.SceneSpec.class_cue`), the token grid (patch size);
- how brittle the base is (mean cosine of a base embedding under the label-free L∞ attack to its clean self):
  Gaussian pixel noise during pre-training (:attr:`pretrain.PretrainSpec.noise_std`) and the token grid.

A *job* is one (world, seed): the base is pre-trained once, then fine-tuned by the library's `AFTTrainer` as ``aft``
at each (learning rate, ε) cell of the job, as the ``random`` control at the same cells, and once as the ``clean``
control (ε = 0; with weight decay 0 its gradient is exactly zero, so it is the base at any learning rate and ε,
which the job checks bit for bit). Every fine-tuning runs with the library's map monitor attached as a user would
(one :class:`MapMonitorCallback`, on held-out validation scenes, at :attr:`StudySpec.guard_points`): its guard
(energy pointing game, tolerance 0.02, patience 2) says whether and when it fired; the best of those evaluations
(base included) is what ``load_best_model_at_end`` would have kept. The study replays the guard and never stops a
run (``stop_after_collapses=0``), so that every cell trains for the same number of steps.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# The laptop-scale modules (scenes, pretrain, finetune, measure, experiment) are reused as they are.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "laptop_scale"))

import torch
from experiment import ExperimentConfig, prepare_world, validation_monitor
from finetune import FinetuneSpec, finetune
from measure import PRIMARY_METRIC, evaluate_tower
from pretrain import PretrainSpec, TowerSpec
from scenes import SceneSpec

from hf_clip_aft.interpret.monitor import MonitorSettings

LEARNING_RATES = (1e-5, 1e-4, 1e-3)
EPSILONS = (2.0, 4.0, 8.0)  # units of 1/255
CONTROLS = ("clean", "random")


@dataclass(frozen=True)
class StudySpec:
    """What every job shares.

    Attributes:
        finetune: steps, batch size and attack steps of every fine-tuning (lr and ε are set per cell).
        attack_steps: PGD steps of the evaluation's attack (robust accuracy, attack cosine).
        monitor_images: held-out validation scenes the guard's monitor measures.
        guard_points: fine-tuning steps at which the monitor measures (the base is measured once, at step 0): every
            ``finetune.monitor_steps`` steps and the last step.
        guard_tolerance, guard_patience: the guard of issue 19 (energy pointing game units; evaluations in a row).
    """

    finetune: FinetuneSpec = field(
        default_factory=lambda: FinetuneSpec(steps=30, batch_size=32, attack_steps=4, monitor_steps=8)
    )
    attack_steps: int = 4
    monitor_images: int = 48
    guard_points: tuple[int, ...] = (8, 16, 24, 30)
    guard_tolerance: float = 0.02
    guard_patience: int = 2

    def __post_init__(self) -> None:
        every, steps = self.finetune.monitor_steps, self.finetune.steps
        measured = tuple(sorted({*range(every, steps + 1, every), steps}))
        if self.guard_points != measured:
            raise ValueError(
                f"guard_points={self.guard_points}: a monitor every {every} steps of {steps} measures at {measured}."
            )


def _world(
    patch: int = 8,
    pretrain_steps: int = 300,
    class_cue: float = 0.0,
    noise_std: float = 0.0,
    clutter_items: tuple[int, int] = (12, 20),
    train_size: int = 1200,
    eval_size: int = 150,
    image_size: int = 32,
    object_size: tuple[int, int] = (12, 18),
    logit_scale: float = 10.0,
) -> ExperimentConfig:
    """A world of 6 classes: `image_size`-pixel scenes (32 by default, objects 12-18 px), one tower (width 64,
    4 layers; ``(image_size / patch)²`` tokens), pre-training at batch 64 with cosine logits scaled by `logit_scale`
    (the inverse temperature). The stripe period scales with the image, so a 64-px scene is a 32-px one drawn finer."""
    return ExperimentConfig(
        scenes=SceneSpec(
            image_size=image_size,
            object_size=object_size,
            clutter_items=clutter_items,
            stripe_period=4.0 * image_size / 32,
            class_cue=class_cue,
        ),
        tower=TowerSpec(image_size=image_size, patch_size=patch),
        pretrain=PretrainSpec(
            steps=pretrain_steps,
            batch_size=64,
            warmup=min(100, pretrain_steps // 10),
            noise_std=noise_std,
            logit_scale=logit_scale,
        ),
        train_size=train_size,
        eval_size=eval_size,
    )


# One dial moved at a time from `reference`, plus one world with two dials (fine grid and noisy pre-training).
# `sparse_clutter` was added after the first six jobs had all given bases whose maps localise poorly.
WORLDS: dict[str, ExperimentConfig] = {
    "reference": _world(),
    "short_pretrain": _world(pretrain_steps=100),
    "long_pretrain": _world(pretrain_steps=1000),
    "class_cue": _world(class_cue=0.8),
    "sparse_clutter": _world(clutter_items=(0, 2)),
    "noisy_pretrain": _world(noise_std=24.0),
    "grid8": _world(patch=4),
    "grid8_noisy": _world(patch=4, noise_std=24.0),
    "grid8_sparse": _world(patch=4, clutter_items=(0, 2)),
}
WORLD_DIALS = {
    "reference": "4×4 tokens, 300 pre-training steps, class-free clutter, no noise",
    "short_pretrain": "pre-training 100 steps",
    "long_pretrain": "pre-training 1000 steps",
    "class_cue": "80% of scenes draw their clutter in the class's colour",
    "sparse_clutter": "0-2 clutter items instead of 12-20 (added after six jobs, to reach a base that localises)",
    "noisy_pretrain": "Gaussian pixel noise σ = 24/255 during pre-training",
    "grid8": "8×8 tokens (patch 4)",
    "grid8_noisy": "8×8 tokens and noise σ = 24/255",
    "grid8_sparse": "8×8 tokens and 0-2 clutter items (added after nine jobs: the two dials that raised base EPG most)",
}
# Toy sizes for the smoke run (seconds; numbers mean nothing).
SMOKE_WORLD = ExperimentConfig(
    scenes=SceneSpec(image_size=16, object_size=(6, 9), clutter_items=(3, 5), class_cue=0.5),
    tower=TowerSpec(image_size=16, width=16, layers=1, heads=2, projection_dim=8),
    pretrain=PretrainSpec(steps=3, batch_size=16, warmup=1, noise_std=8.0),
    train_size=32,
    eval_size=16,
)
SMOKE_SPEC = StudySpec(
    finetune=FinetuneSpec(steps=2, batch_size=8, attack_steps=2, monitor_steps=1),
    attack_steps=2,
    monitor_images=8,
    guard_points=(1, 2),
)


def guard_summary(base: dict[str, float], trace: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """What the guard and best-checkpoint selection would have done, from the monitor's evaluations.

    Returns ``fired_at`` (first step the guard fired, None when silent), ``best_step`` (the evaluation with the
    highest `metric`, step 0 being the base: what ``load_best_model_at_end`` keeps), and ``best_value``.
    """
    fired = [point["step"] for point in trace if point["guard_fired"]]
    points = [(0, base[metric])] + [(point["step"], point[metric]) for point in trace]
    best_step, best_value = max(points, key=lambda point: point[1])  # the first of equal values: the earliest
    return {"fired_at": fired[0] if fired else None, "best_step": best_step, "best_value": best_value}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_job(
    world_name: str,
    config: ExperimentConfig,
    seed: int,
    cells: list[tuple[float, float]],
    spec: StudySpec,
) -> dict[str, Any]:
    """Pre-train the base of (`config`, `seed`) and fine-tune it at every ``(learning_rate, eps)`` of `cells`.

    Returns a JSON-ready dict: the base's metrics (its attack cosine and robust accuracy at every ε of the cells),
    whether the clean control stayed at the base, and one record per fine-tuning (``runs``).
    """
    clock = time.perf_counter()
    world = prepare_world(config, seed, "test")
    settings = MonitorSettings(
        max_images=spec.monitor_images,
        guard_tolerance=spec.guard_tolerance,
        guard_patience=spec.guard_patience,
        stop_after_collapses=0,
    )
    monitor = validation_monitor(world, config, seed, spec.monitor_images, settings)
    base_monitor = monitor.measure(world.base)

    def evaluate(model, eps: float) -> dict[str, float]:
        return evaluate_tower(
            model,
            world.processor,
            world.eval_pixels,
            world.eval_masks,
            world.eval_labels,
            world.class_embeds,
            eps,
            seed,
            attack_steps=spec.attack_steps,
            faithfulness=False,
        )[0]

    base = {eps: evaluate(world.base, eps) for eps in sorted({eps for _, eps in cells})}

    def fine_tune(variant: str, lr: float, eps: float) -> tuple[dict[str, Any], torch.nn.Module]:
        ft_spec = dataclasses.replace(spec.finetune, learning_rate=lr, eps=eps)
        start = time.perf_counter()
        result = finetune(world.base, world.processor, world.train_images, variant, ft_spec, seed, monitor=monitor)
        evaluation = result.training_evaluation
        trace = [
            {**point, "guard_fired": point["step"] in evaluation["guard_fired_steps"]}
            for point in evaluation["history"][1:]
        ]
        record = {
            "world": world_name,
            "seed": seed,
            "variant": variant,
            "learning_rate": lr,
            "eps": eps,
            "metrics": evaluate(result.model, eps),
            "guard_trace": trace,
            "guard": guard_summary(base_monitor, trace, PRIMARY_METRIC),
            "seconds": time.perf_counter() - start,
        }
        return record, result.model

    runs = []
    # The clean control does not depend on ε (its attack radius is 0 whatever ε is given; ε only sets the evaluation's
    # robustness check): run once, at the largest learning rate and ε of the cells.
    clean_record, clean_model = fine_tune("clean", max(lr for lr, _ in cells), max(eps for _, eps in cells))
    clean_is_base = _same_weights(clean_model, world.base)
    runs.append(clean_record)
    for lr, eps in cells:
        for variant in ("aft", "random"):
            runs.append(fine_tune(variant, lr, eps)[0])
    return {
        "world": world_name,
        "seed": seed,
        "pretrain_loss": world.pretrain_loss,
        "base": {str(eps): metrics for eps, metrics in base.items()},
        "base_monitor": base_monitor,
        "clean_is_base": clean_is_base,
        "runs": runs,
        "seconds": time.perf_counter() - clock,
    }
