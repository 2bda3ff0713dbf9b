"""What the comparison page computes and draws, without the page: models, prompts, probabilities, maps, the figure.

Every number comes from :mod:`hf_clip_aft.interpret`: models load with :func:`~hf_clip_aft.interpret.load_clip`,
class embeddings are its prompt ensemble (:func:`~hf_clip_aft.interpret.class_text_embeddings`), maps are
:func:`~hf_clip_aft.interpret.saliency` of any registered map method. This module only arranges and colours them.

Maps are shown on one colour scale per method: each map is divided by its mean over the image (so 1 is the
saliency of an average pixel, whatever the method's units, as the scale-invariant metrics see it), and every model's
map of that method is coloured from 0 to the same top value, the largest 99th percentile among them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm
from transformers import AutoConfig

from ..data import clip_image_processor, images_to_pixels
from ..data import open_image as read_rgb_image
from ..interpret import MAP_METHODS, PROMPT_TEMPLATES, class_text_embeddings, get_map_method, load_clip, saliency
from ..interpret.figures import colorize
from ..interpret.saliency import upsample
from ..interpret.suite import LoadedModel
from ..interpret.surgery import empty_prompt_embedding
from ..release.record import TrainingRecord

PHOTOS_DIR = Path(__file__).resolve().parents[1] / "assets" / "photos"
TINY_CLIP_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-clip"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Prompt styles: class names filled into the 7-template ensemble of the evaluation, or used as typed.
PROMPT_STYLES: dict[str, tuple[str, ...]] = {"ensemble": PROMPT_TEMPLATES, "as typed": ("{}",)}
SCALE_QUANTILE = 0.99


def example_images(folder: str | os.PathLike = PHOTOS_DIR) -> list[Path]:
    """The image files under `folder` (recursively), sorted: the page's examples (default: the shipped photos)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


# Preset class lists; the first is the shipped photos' subjects (their folder names), so every example has its class.
PROMPT_PRESETS: dict[str, str] = {
    "the example photos": ", ".join(dict.fromkeys(p.parent.name for p in example_images())),
    "animals": "cat, dog, horse, bird, fish, cow",
    "space": "astronaut, rocket, galaxy, planet, satellite",
    "household objects": "clock, cup of coffee, camera, chair, lamp",
}


def parse_prompts(text: str | None) -> list[str]:
    """The class prompts in a comma-separated string, stripped, empty ones dropped, each kept once in order."""
    names = list(dict.fromkeys(part.strip() for part in (text or "").split(",") if part.strip()))
    if not names:
        raise ValueError("No class prompts: type two or more class names separated by commas, e.g. 'cat, dog'.")
    return names


def default_methods() -> list[str]:
    """The maps shown when the page opens: the first registered map method of each family."""
    first: dict[str, str] = {}
    for method in MAP_METHODS.values():
        first.setdefault(method.family, method.name)
    return list(first.values())


def model_label(name: str) -> str:
    """A model's short name on the page: a Hub id as it is, a local folder by its last component."""
    return name if not os.path.exists(name) else os.path.basename(os.path.normpath(name)) or name


def check_clip(name: str) -> None:
    """Raise ValueError unless `name` (Hub id or folder) holds a CLIP model (config ``model_type`` ``clip``)."""
    try:
        model_type = AutoConfig.from_pretrained(name).model_type
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Cannot read a model config from {name!r} ({err}). Give a CLIPModel folder or Hub id."
        ) from err
    if model_type != "clip":
        raise ValueError(
            f"{name!r} is a {model_type!r} model, not a CLIP one; give CLIPModel folders or Hub ids (e.g. "
            "openai/clip-vit-base-patch16 and its AFT version)."
        )


def demo_weights_note(name: str) -> str | None:
    """Why the model `name` has random (demo) weights, or None: the shipped ``hf_clip_aft/assets/tiny-clip`` (random
    weights), or a folder whose ``training_record.json`` says it was fine-tuned from it (the offline demo). Its maps
    and probabilities show that the page runs, nothing about CLIP or AFT."""
    if not os.path.isdir(name):
        return None
    if os.path.samefile(name, TINY_CLIP_DIR):
        return "the shipped tiny-clip test model: random weights"
    try:
        record = TrainingRecord.load(name)
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable record says nothing either way
        return None
    if record is not None and record.base_model == TINY_CLIP_DIR.name and not record.base_model_on_hub:
        return "fine-tuned from the random tiny-clip (the offline demo)"
    return None


def load_models(names: Sequence[str], device: str | torch.device) -> tuple[list[LoadedModel], dict[str, str]]:
    """Load each named CLIP once, in order; returns the loaded models and ``{name: why not}`` for the others.

    A name that is not a CLIP (or cannot be read) does not stop the others: the page shows why it is missing.
    """
    if len(set(names)) != len(names):
        raise ValueError(f"models={list(names)} names a model twice; give each model once.")
    loaded, problems = [], {}
    for name in tqdm(names, desc="loading models"):
        try:
            check_clip(name)
            loaded.append(load_clip(name, device))
        except (OSError, ValueError) as err:
            problems[name] = str(err)
    return loaded, problems


def open_image(path: str | os.PathLike, name: str | None = None) -> Image.Image:
    """The image file at `path` as RGB, through the package's one image reader (:func:`hf_clip_aft.data.open_image`:
    EXIF orientation, 16-bit scaled to 8, transparency over white, CMYK, decompression bombs refused); ValueError
    naming the file (`name`, default its file name) when it is missing or not a readable image."""
    try:
        return read_rgb_image(path)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        name = name or os.path.basename(str(path))
        # The decoder's message names the server-side path; the page names the user's file only.
        raise ValueError(f"Cannot read {name!r} as an image; upload a JPEG, PNG or WebP file.") from err


@dataclass
class ModelResult:
    """One model's answer for the image.

    Attributes:
        name: the model as given (Hub id or folder).
        probabilities: ``{class: probability}`` of zero-shot classification over the prompts, highest first.
        target: the class whose prompt embedding the maps explain.
        maps: ``{method: (S, S)}`` maps at the figure's resolution, divided by their mean (1 = an average pixel).
    """

    name: str
    probabilities: dict[str, float]
    target: str
    maps: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Comparison:
    """Everything the figure shows: the image as the models see it (centre crop), the methods, each model's result."""

    image: torch.Tensor  # (3, S, S) in [0, 1]
    methods: list[str]
    results: list[ModelResult]

    def scale(self, method: str) -> float:
        """The top of `method`'s shared colour scale: the largest `SCALE_QUANTILE` quantile among the models' maps."""
        tops = [torch.quantile(r.maps[method].flatten(), SCALE_QUANTILE).item() for r in self.results]
        top = max(tops)
        return top if top > 0 else 1.0


def relative_map(saliency_map: torch.Tensor, size: int) -> torch.Tensor:
    """A map ``(h, w)`` upsampled to ``(size, size)`` and divided by its mean (a zero map stays zero)."""
    resized = upsample(saliency_map[None].float().cpu(), (size, size))[0].clamp(min=0)
    mean = resized.mean()
    return resized / mean if mean > 0 else resized


def compare(
    image: Image.Image,
    models: Sequence[LoadedModel],
    class_names: Sequence[str],
    methods: Sequence[str],
    *,
    target: str | None = None,
    prompt_style: str = "ensemble",
    size: int = 224,
    seed: int = 0,
    method_options: Mapping[str, Any] | None = None,
) -> Comparison:
    """Zero-shot probabilities and maps of every model for one image.

    Args:
        image: the image (any PIL mode).
        models: the loaded models (:func:`load_models`), compared in this order.
        class_names: the class prompts (two or more make the probabilities meaningful; one is allowed).
        methods: registered map methods (:data:`hf_clip_aft.interpret.MAP_METHODS`).
        target: the class whose prompt the maps explain (one of `class_names`); None: each model's top class.
        prompt_style: a key of :data:`PROMPT_STYLES`.
        size: side of the figure's tiles in pixels (maps are upsampled bilinearly to it).
        seed: torch seed set before every map, so stochastic methods (SmoothGrad) draw the same noise per model.
        method_options: options for the map methods (:func:`hf_clip_aft.interpret.saliency`'s keywords).
    """
    if not models:
        raise ValueError("No model to compare: load at least one CLIP model.")
    if not methods:
        raise ValueError(f"No map method chosen: pick one or more of {tuple(MAP_METHODS)}.")
    for method in methods:
        get_map_method(method)
    if prompt_style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style={prompt_style!r} is not one of {list(PROMPT_STYLES)}.")
    if target is not None and target not in class_names:
        raise ValueError(f"The class to explain, {target!r}, is not among the prompts {list(class_names)}.")
    results = []
    steps = tqdm(total=len(models) * (1 + len(methods)), desc="comparing")
    for loaded in models:
        device = next(loaded.model.parameters()).device
        pixels = images_to_pixels([image], loaded.processor.image_processor).to(device)
        steps.set_postfix_str(f"{model_label(loaded.name)}: zero-shot")
        with torch.no_grad():
            templates = PROMPT_STYLES[prompt_style]
            class_embeds = class_text_embeddings(loaded.model, loaded.processor.tokenizer, class_names, templates)
            # CLIP Surgery's redundant feature for one target: the empty prompt, with the same templates.
            empty_prompt = empty_prompt_embedding(loaded.model, loaded.processor.tokenizer, templates)
            logits = loaded.model.logit_scale.exp() * loaded.embed(pixels) @ class_embeds.t()
        probs = logits.softmax(dim=-1)[0].cpu()
        order = probs.argsort(descending=True).tolist()
        index = class_names.index(target) if target is not None else order[0]
        result = ModelResult(loaded.name, {class_names[i]: probs[i].item() for i in order}, class_names[index])
        steps.update()
        for method in methods:
            steps.set_postfix_str(f"{model_label(loaded.name)}: {method}")
            torch.manual_seed(seed)
            maps = saliency(
                loaded.model,
                pixels,
                class_embeds[index : index + 1],
                method,
                image_processor=loaded.processor.image_processor,
                **{"empty_prompt_embeds": empty_prompt, **(method_options or {})},
            )
            result.maps[method] = relative_map(maps[0], size)
            steps.update()
        results.append(result)
    steps.close()
    # The crop every model sees (shortest-side resize + centre crop), redrawn at the tile size for display.
    shown = images_to_pixels([image], clip_image_processor(size))[0]
    return Comparison(shown, list(methods), results)


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """RGB ``(3, H, W)`` of values ``(H, W)`` in [0, 1] through the evaluation figures' heat ramp, 0 -> black,
    1 -> white, on this absolute scale."""
    # colorize stretches each map from its minimum to its top; the appended 0 and 1 pin that stretch to [0, 1].
    pinned = torch.cat([values.flatten().clamp(0, 1), torch.tensor([0.0, 1.0])])
    return colorize(pinned[None], quantile=1.0)[:, 0, :-2].reshape(3, *values.shape)


def overlay(image: torch.Tensor, relative: torch.Tensor, top: float, opacity: float) -> torch.Tensor:
    """The image ``(3, H, W)`` blended with the heat colours of a map ``(H, W)`` scaled from 0 to `top`.

    `opacity` in [0, 1]: 0 shows the image alone, 1 the map alone.
    """
    if not 0 <= opacity <= 1:
        raise ValueError(f"opacity={opacity} must be in [0, 1].")
    return (1 - opacity) * image + opacity * heat_colours(relative / top)


# The difference view's diverging ramp: base higher (blue), equal (white), last model higher (red).
_DIVERGING = torch.tensor([[30, 90, 200], [255, 255, 255], [200, 30, 0]], dtype=torch.float32) / 255


def difference_colours(difference: torch.Tensor, bound: float) -> torch.Tensor:
    """RGB ``(3, H, W)`` of a difference map ``(H, W)`` on the symmetric scale ``[-bound, bound]``: blue below 0,
    white at 0, red above (clipped at the bound)."""
    position = (difference / bound).clamp(-1, 1) + 1  # in [0, 2]
    low = position.floor().long().clamp(max=1)
    weight = (position - low).unsqueeze(-1)
    return (_DIVERGING[low] * (1 - weight) + _DIVERGING[low + 1] * weight).permute(2, 0, 1)


def _to_pil(rgb: torch.Tensor) -> Image.Image:
    return Image.fromarray((rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def comparison_figure(comparison: Comparison, opacity: float = 0.6) -> Image.Image:
    """The side-by-side figure: a column per model (headed by its name and top class), a row per map method, and
    at the right of each row its colour bar (0 to the shared top, in multiples of the image's mean saliency). With
    two or more models a last column shows the difference, last model − first (e.g. AFT − base), of the same relative
    maps: red where the last model's map is higher, blue where the first's is, on a symmetric scale (±, written on
    the tile) set by the largest 99th percentile of the absolute difference."""
    size = comparison.image.shape[-1]
    font = ImageFont.load_default(size=max(11, size // 16))
    line = font.size + 4
    label_width, bar_width = size // 2, max(64, size // 3)
    header = 3 * line + 6
    models = comparison.results
    columns = len(models) + (len(models) > 1)
    width = label_width + columns * size + bar_width
    canvas = Image.new("RGB", (width, header + len(comparison.methods) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for j, result in enumerate(models):
        x = label_width + j * size + 4
        draw.text((x, 3), model_label(result.name), fill="black", font=font)
        best, p = next(iter(result.probabilities.items()))
        draw.text((x, 3 + line), f"top: {best} ({p:.0%})", fill="dimgray", font=font)
        draw.text((x, 3 + 2 * line), f"maps explain: {result.target}", fill="dimgray", font=font)
    if len(models) > 1:
        x = label_width + len(models) * size + 4
        last, first = model_label(models[-1].name), model_label(models[0].name)
        draw.text((x, 3), f"{last} minus {first}", fill="black", font=font)
        draw.text((x, 3 + line), f"red: {last} higher", fill=(200, 30, 0), font=font)
        draw.text((x, 3 + 2 * line), f"blue: {first} higher", fill=(30, 90, 200), font=font)
    bar_x = label_width + columns * size + 6
    draw.multiline_text((bar_x, 3), "saliency /\nimage\nmean", fill="dimgray", font=font)
    for i, method in enumerate(comparison.methods):
        y = header + i * size
        top = comparison.scale(method)
        draw.multiline_text((4, y + 4), get_map_method(method).label.replace(" ", "\n"), fill="black", font=font)
        for j, result in enumerate(models):
            tile = overlay(comparison.image, result.maps[method], top, opacity)
            canvas.paste(_to_pil(tile), (label_width + j * size, y))
        if len(models) > 1:
            difference = models[-1].maps[method] - models[0].maps[method]
            bound = torch.quantile(difference.abs().flatten(), SCALE_QUANTILE).item() or 1.0
            tile = (1 - opacity) * comparison.image + opacity * difference_colours(difference, bound)
            x = label_width + len(models) * size
            canvas.paste(_to_pil(tile), (x, y))
            draw.text((x + 4, y + 4), f"±{bound:.3g}", fill="black", font=font, stroke_width=2, stroke_fill="white")
        # The colour bar: top value at the top, 0 at the bottom.
        bar = heat_colours(torch.linspace(1, 0, size - 2 * line)[:, None].expand(-1, 16))
        canvas.paste(_to_pil(bar), (bar_x, y + line))
        draw.text((bar_x + 20, y + line - font.size // 2), f"{top:.3g}", fill="black", font=font)
        draw.text((bar_x + 20, y + size - line - font.size // 2), "0", fill="black", font=font)
    return canvas
