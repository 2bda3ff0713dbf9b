"""The map monitor's measurement: what the evaluation suite would report on a fixed held-out set (map metrics,
zero-shot accuracy), plus the collapse signs, for the weights of the moment (:class:`MapMonitor`).

Masks are read and scored as the evaluation suite does: :func:`hf_clip_aft.interpret.batches.localisation_masks`
(0 background, 255 unannotated, any other value object), the registered metrics of the ``localization`` group over
the annotated pixels only, and an image with no annotated or no object pixel in the model's crop skipped and
counted. Every registered map method runs: ``attention`` and ``rollout`` switch the model to eager attention for
the measurement; ``clip_surgery`` needs the empty prompt's text embedding, and is refused at start-up without it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import datasets
import torch
from torch import nn
from transformers import PreTrainedModel

from ..data import find_image_column, images_to_pixels, open_image
from ..modeling import embed_fn
from .batches import check_mask_size, localisation_masks, open_mask, scorable_masks
from .monitor_metrics import MASK_FREE_METRICS, MASK_METRICS, embedding_spread, majority_share
from .registry import MAP_METHODS, RunContext, get_map_method, get_metric
from .saliency import class_similarity, saliency
from .zero_shot import zero_shot_predictions

logger = logging.getLogger(__name__)

# Methods whose single-target map subtracts the empty prompt's text embedding (CLIP Surgery's redundant feature,
# :func:`hf_clip_aft.interpret.surgery.target_maps`): the monitor must be given it.
EMPTY_PROMPT_METHODS = ("clip_surgery",)


def needs_empty_prompt(method: str) -> bool:
    """Whether map `method` needs ``empty_prompt_embeds`` (the text embedding of the empty class prompt)."""
    return method in EMPTY_PROMPT_METHODS


def check_method_inputs(method: str, empty_prompt_embeds: torch.Tensor | None) -> None:
    """Refuse, before any measurement, a map method that could not run with what the monitor is given."""
    if needs_empty_prompt(method) and empty_prompt_embeds is None:
        without = ", ".join(name for name in MAP_METHODS if not needs_empty_prompt(name))
        raise ValueError(
            f"The map monitor's method={method!r} needs the empty prompt's text embedding (CLIP Surgery's redundant "
            "feature for one target), and none was given: pass empty_prompt_embeds=hf_clip_aft.interpret.surgery."
            "empty_prompt_embedding(clip_model, tokenizer) (the train command does so when the checkpoint has a "
            f"tokenizer and a text tower), or choose a method that needs no text: {without}."
        )


@contextmanager
def _attention_weights_kept(model: nn.Module, method: str) -> Iterator[None]:
    """Run the block with eager attention when `method` reads attention weights (SDPA never materialises them),
    then restore the model's implementation; any other method runs the model as it is."""
    if get_map_method(method).needs != "attentions":
        yield
        return
    pretrained = next(module for module in model.modules() if isinstance(module, PreTrainedModel))
    previous = pretrained.config._attn_implementation
    pretrained.set_attn_implementation("eager")
    try:
        yield
    finally:
        pretrained.set_attn_implementation(previous)


@dataclass
class MonitorSettings:
    """What the monitor computes; the fields of ``AFTConfig`` with the same names feed it (see the train command).

    ``iou_fraction`` and ``faithfulness_steps`` are named as the evaluation's arguments, whose registered metrics
    read them.

    Attributes:
        method: the map method (a name of the map-method registry; cheap ``simple_gradient`` by default).
        max_images: held-out images measured (the first of the given set).
        batch_size: images per forward/backward.
        faithfulness_steps: deletion/insertion steps (mask-free metrics).
        iou_fraction: share of top pixels compared with the mask (``top_k_iou``).
        guard_metric: the metric the guard watches; None = the primary map metric (``energy_pointing_game`` with
            masks, else ``deletion_auc``).
        guard_tolerance, guard_patience: see :class:`~hf_clip_aft.interpret.monitor_metrics.MapGuard`.
        collapse_ratio: collapse when the embedding spread falls below this share of the base's (0: never).
        majority_limit: collapse when one class takes more than this share of the zero-shot predictions (and twice
            the base's share); 1: never. A collapsed measurement warns, is never the best model, and is not exported
            (see :class:`~hf_clip_aft.interpret.monitor.MapMonitorCallback`).
        stop_after_collapses: stop training after this many measurements in a row show collapse (the spread below
            `collapse_ratio` × the base's, or one class taking over the predictions); 0 (the default) = never stop
            for it. A collapsed encoder has been seen to recover (experiments/when_aft_helps, `collapse_world`:
            collapsed at steps 15 and 30, not from step 45), and a collapsed measurement is never exported (the
            callback's end rule), so stopping only saves compute.
        stop_if_maps_worse: stop training at the first warning (the guard firing, or collapse).
    """

    method: str = "simple_gradient"
    max_images: int = 64
    batch_size: int = 16
    faithfulness_steps: int = 10
    iou_fraction: float = 0.2
    guard_metric: str | None = None
    guard_tolerance: float = 0.02
    guard_patience: int = 2
    collapse_ratio: float = 0.25
    majority_limit: float = 0.5
    stop_after_collapses: int = 0
    stop_if_maps_worse: bool = False

    def __post_init__(self) -> None:
        get_map_method(self.method)  # an unknown method fails here, listing the registered ones
        for name in ("max_images", "batch_size", "faithfulness_steps", "guard_patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.max_images < 2:
            raise ValueError(f"max_images={self.max_images} must be at least 2 (the embedding spread needs pairs).")
        if not 0 < self.iou_fraction < 1:
            raise ValueError(f"iou_fraction={self.iou_fraction} must lie in (0, 1).")
        if not 0 <= self.collapse_ratio < 1:
            raise ValueError(f"collapse_ratio={self.collapse_ratio} must lie in [0, 1).")
        if not 0 < self.majority_limit <= 1:
            raise ValueError(f"majority_limit={self.majority_limit} must lie in (0, 1] (1: never).")
        if self.stop_after_collapses < 0:
            raise ValueError(f"stop_after_collapses={self.stop_after_collapses} must be >= 0 (0: never stop).")
        if self.guard_tolerance < 0:
            raise ValueError(f"guard_tolerance={self.guard_tolerance} must be >= 0 (metric units).")


class MapMonitor:
    """Map metrics, zero-shot accuracy and collapse signs of a vision tower on a fixed held-out set.

    Args:
        pixels: ``(N, 3, H, W)`` held-out images in [0, 1] at the model's resolution.
        image_processor: the model's image processor (mean/std normalisation inside the encoder).
        reference_embeds: ``(N, D)`` the frozen base's L2-normalised clean embeddings f0(x).
        masks: ``(N, H, W)`` boolean object masks, or None (mask-free metrics then).
        labels: ``(N,)`` class indices, with `class_embeds`; or None.
        class_embeds: ``(C, D)`` L2-normalised class text embeddings; or None.
        settings: :class:`MonitorSettings`.
        annotated: ``(N, H, W)`` boolean, False on the pixels the masks leave unannotated (mask value 255), which
            the localisation metrics leave out; None: every pixel is annotated.
        empty_prompt_embeds: ``(D,)`` the text embedding of the empty class prompt
            (:func:`hf_clip_aft.interpret.surgery.empty_prompt_embedding`), needed by ``clip_surgery`` maps.

    The map explains each image's class prompt when labels and class embeddings are given, else the image's own
    base embedding f0(x) (a label-free target: where does the encoder look to stay close to its base?). Of the
    first ``settings.max_images`` images, those whose mask has no annotated pixel or no object pixel are left out
    (counted in :attr:`skipped`, with a warning), as the evaluation does.
    """

    def __init__(
        self,
        pixels: torch.Tensor,
        image_processor,
        reference_embeds: torch.Tensor,
        masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        class_embeds: torch.Tensor | None = None,
        settings: MonitorSettings | None = None,
        *,
        annotated: torch.Tensor | None = None,
        empty_prompt_embeds: torch.Tensor | None = None,
    ) -> None:
        self.settings = settings or MonitorSettings()
        check_method_inputs(self.settings.method, empty_prompt_embeds)
        if (labels is None) != (class_embeds is None):
            raise ValueError("Pass labels and class_embeds together (both or neither).")
        if annotated is not None and masks is None:
            raise ValueError("annotated= marks the unannotated pixels of the masks: pass masks with it.")
        n = min(len(pixels), self.settings.max_images)
        keep = torch.ones(n, dtype=torch.bool)
        self.skipped: dict[str, int] = {}
        if masks is not None:
            annotated = torch.ones_like(masks[:n], dtype=torch.bool) if annotated is None else annotated[:n].bool()
            masks = masks[:n].bool() & annotated
            keep, skipped = scorable_masks(masks, annotated)  # the evaluation's rule and reasons
            self.skipped = {why: count for why, count in skipped.items() if count}
            if self.skipped:
                logger.warning(
                    "Map monitor: %d of %d held-out images skipped: %s in the model's crop (mask value 255 = "
                    "unannotated, 0 = background, any other value = object).",
                    n - int(keep.sum()),
                    n,
                    ", ".join(f"{count} with {why}" for why, count in self.skipped.items()),
                )
        if int(keep.sum()) < 2:
            raise ValueError(
                f"The held-out set has {int(keep.sum())} usable images of {len(pixels)} given; the monitor needs at "
                "least 2 (with masks: each with an annotated object pixel in the model's crop)."
            )
        self.pixels = pixels[:n][keep]
        self.image_processor = image_processor
        self.reference_embeds = reference_embeds[:n][keep].float()
        self.masks = None if masks is None else masks[keep]
        self.annotated = None if annotated is None else annotated[keep]
        self.labels = None if labels is None else labels[:n][keep]
        self.class_embeds = class_embeds
        self.empty_prompt_embeds = empty_prompt_embeds
        self.metric_names = MASK_METRICS if self.masks is not None else MASK_FREE_METRICS
        self.primary_metric = "energy_pointing_game" if self.masks is not None else "deletion_auc"
        # The registered metrics' settings read the evaluation's argument names, which MonitorSettings shares.
        self._run = RunContext(self.settings, [self.settings.method], [], None, (), 0)

    @property
    def available_metrics(self) -> tuple[str, ...]:
        """The names :meth:`measure` returns, in its order."""
        labelled = () if self.class_embeds is None else ("accuracy", "majority_share")
        return ("embedding_drift", "embedding_spread", *labelled, *self.metric_names)

    @classmethod
    def from_dataset(
        cls,
        model: nn.Module,
        dataset: datasets.Dataset,
        image_processor,
        image_column: str | None = None,
        mask_column: str | None = None,
        label_column: str | None = None,
        class_embeds: torch.Tensor | None = None,
        settings: MonitorSettings | None = None,
        *,
        empty_prompt_embeds: torch.Tensor | None = None,
    ) -> MapMonitor:
        """Build the monitor from the first ``settings.max_images`` rows of `dataset`, with `model` as the base f0.

        Masks are read as the evaluation reads them (:func:`~hf_clip_aft.interpret.batches.open_mask`, in their own
        mode; :func:`~hf_clip_aft.interpret.batches.localisation_masks`: 255 unannotated); a mask whose size differs
        from its image's is an error naming the row. Rows whose image (or mask) does not decode are skipped with a
        warning, never fatal.
        """
        settings = settings or MonitorSettings()
        check_method_inputs(settings.method, empty_prompt_embeds)
        image_column = find_image_column(dataset.features, image_column)
        images, masks, labels, skipped = [], [], [], 0
        for index, row in enumerate(dataset.select(range(min(len(dataset), settings.max_images)))):
            try:
                image = open_image(row[image_column])
                mask = None if mask_column is None else open_mask(row[mask_column])
            except (OSError, ValueError) as error:
                skipped += 1
                logger.warning("Map monitor: skipped a held-out image that does not decode (%s).", error)
                continue
            if mask is not None:
                check_mask_size(image, mask, f"held-out row {index}")
            images.append(image)
            masks.append(mask)
            labels.append(None if label_column is None else int(row[label_column]))
        if skipped:
            logger.warning("Map monitor: %d of %d held-out images skipped.", skipped, skipped + len(images))
        pixels = images_to_pixels(images, image_processor)
        objects, annotated = (None, None) if mask_column is None else localisation_masks(masks, image_processor)
        label_tensor = None if label_column is None else torch.tensor(labels)
        reference = _embed_batched(embed_fn(model, image_processor), pixels, settings.batch_size, _device(model))
        return cls(
            pixels,
            image_processor,
            reference,
            objects,
            label_tensor,
            class_embeds,
            settings,
            annotated=annotated,
            empty_prompt_embeds=empty_prompt_embeds,
        )

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Every monitored number for `model` (a vision tower, possibly wrapped by peft), as plain floats.

        Deterministic: the map method and the faithfulness curves draw no random numbers for the default method;
        stochastic methods are seeded per call.
        """
        was_training = model.training
        model.eval()
        try:
            with _attention_weights_kept(model, self.settings.method):
                return self._measure(model)
        finally:
            model.train(was_training)

    def _measure(self, model: nn.Module) -> dict[str, float]:
        s = self.settings
        device = _device(model)
        embed = embed_fn(model, self.image_processor)
        embeds = _embed_batched(embed, self.pixels, s.batch_size, device)
        out = {
            "embedding_drift": float((embeds - self.reference_embeds).pow(2).sum(dim=-1).mean()),
            "embedding_spread": embedding_spread(embeds),
        }
        if self.class_embeds is not None:
            predictions = zero_shot_predictions(embeds, self.class_embeds.float().cpu())
            out["accuracy"] = float((predictions == self.labels).float().mean())
            out["majority_share"] = majority_share(predictions)
            targets = self.class_embeds.float().cpu()[self.labels]
        else:
            targets = self.reference_embeds
        options = {}
        if self.empty_prompt_embeds is not None:
            options["empty_prompt_embeds"] = self.empty_prompt_embeds.to(device)
        sums: dict[str, float] = dict.fromkeys(self.metric_names, 0.0)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # stochastic map methods (SmoothGrad) see the same noise at every evaluation
        try:
            for start in range(0, len(self.pixels), s.batch_size):
                stop = start + s.batch_size
                pixels = self.pixels[start:stop].to(device)
                text = targets[start:stop].to(device)
                maps = saliency(model, pixels, text, s.method, image_processor=self.image_processor, **options)
                for name, values in self._map_metrics(embed, pixels, text, maps, start, stop).items():
                    sums[name] += float(values.double().sum())
        finally:
            torch.random.set_rng_state(generator_state)
        out.update({name: total / len(self.pixels) for name, total in sums.items()})
        return out

    def _map_metrics(
        self, embed, pixels: torch.Tensor, text: torch.Tensor, maps: torch.Tensor, start: int, stop: int
    ) -> dict[str, torch.Tensor]:
        """Per-image values of every monitored map metric, each called as its evaluation scorer calls it."""
        values = {}
        if self.masks is not None:
            masks = self.masks[start:stop].to(maps.device)
            annotated = self.annotated[start:stop].to(maps.device)
        score = partial(class_similarity, embed, text_embeds=text)
        for name in self.metric_names:
            metric = get_metric(name)
            if metric.group == "sparsity":
                values[name] = metric.compute(maps)
            elif metric.group == "localization":
                values[name] = metric.compute(maps, masks, annotated=annotated, **metric.settings_for(self._run))
            else:  # faithfulness
                values[name] = metric.compute(score, pixels, maps, self.settings.faithfulness_steps)
        return values


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _embed_batched(embed, pixels: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Embeddings of CPU `pixels` computed on `device` in batches, returned on the CPU."""
    return torch.cat([embed(pixels[i : i + batch_size].to(device)).cpu() for i in range(0, len(pixels), batch_size)])
