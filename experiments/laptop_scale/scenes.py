"""Synthetic labelled scenes with exact object masks: one shape/texture object on a cluttered background.

Every scene is drawn from its own `numpy` generator seeded by ``(seed, index)``, so a dataset is a pure function of
its seed and size. Shapes are drawn with Pillow at `SUPERSAMPLE` times the output size and box-filtered down
(anti-aliased edges); the mask is the object's coverage at the output size, thresholded at one half. The clutter
(line segments and dots of random colours on a smooth colour gradient) is drawn behind the object, so the mask is
exactly the object, and by default it carries no class information: only the object does. With
``SceneSpec.class_cue = p``, a share p of the scenes draw all their clutter in their class's colour
(:data:`CUE_COLOURS`): a shortcut a model can learn instead of the object.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle")
FILLS = ("solid", "striped")
CLASS_NAMES = tuple(f"{fill} {shape}" for fill in FILLS for shape in SHAPES)
SUPERSAMPLE = 4
# One clutter colour per class, for scenes that carry the class cue (saturated and far apart).
CUE_COLOURS = ((230, 25, 25), (25, 200, 25), (25, 60, 230), (240, 220, 20), (220, 30, 220), (20, 220, 220))


@dataclass(frozen=True)
class SceneSpec:
    """Geometry of the scenes, in output pixels.

    Attributes:
        image_size: side of the square image.
        object_size: (min, max) side of the object's bounding box.
        clutter_items: (min, max) number of distractor lines and dots.
        stripe_period: period of the striped texture.
        class_cue: share of scenes whose clutter is drawn in the class's colour (0: clutter is class-free).
    """

    image_size: int = 32
    object_size: tuple[int, int] = (12, 18)
    clutter_items: tuple[int, int] = (12, 20)
    stripe_period: float = 4.0
    class_cue: float = 0.0


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """A smooth gradient between two random colours in a random direction."""
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    t = (np.cos(angle) * xs + np.sin(angle) * ys - min(0, np.cos(angle)) - min(0, np.sin(angle))) / (
        abs(np.cos(angle)) + abs(np.sin(angle))
    )
    return Image.fromarray((a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8))


def _draw_clutter(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, spec: SceneSpec, cue: tuple[int, int, int] | None
) -> None:
    """Lines and dots of random colours, or all of colour `cue` when given."""
    side = spec.image_size * SUPERSAMPLE
    for _ in range(int(rng.integers(spec.clutter_items[0], spec.clutter_items[1] + 1))):
        colour = _colour(rng) if cue is None else cue
        if rng.random() < 0.5:
            x0, y0 = rng.uniform(0, side, size=2)
            length, angle = rng.uniform(0.15, 0.4) * side, rng.uniform(0, np.pi)
            end = (x0 + length * np.cos(angle), y0 + length * np.sin(angle))
            draw.line([(x0, y0), end], fill=colour, width=int(rng.integers(1, 3)) * SUPERSAMPLE)
        else:
            x0, y0 = rng.uniform(0, side, size=2)
            r = rng.uniform(0.5, 1.5) * SUPERSAMPLE
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)


def _shape_mask(shape: str, box: tuple[float, float, float, float], side: int, rotation: float) -> Image.Image:
    """The object's silhouette ('L' image, 255 inside) at the supersampled size."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if shape == "disc":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        angles = rotation + np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles], fill=255)
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}.")
    return mask


def _texture(fill: str, rng: np.random.Generator, side: int, period: float) -> Image.Image:
    """The object's fill: one colour, or stripes of two contrasting colours at a random angle."""
    first = np.array(_colour(rng), float)
    if fill == "solid":
        return Image.new("RGB", (side, side), tuple(int(v) for v in first))
    second = 255 - first  # the complementary colour keeps the stripes visible whatever the first colour
    angle = rng.uniform(0, np.pi)
    ys, xs = np.mgrid[0:side, 0:side] / SUPERSAMPLE
    phase = (np.cos(angle) * xs + np.sin(angle) * ys) / period
    on = (np.floor(phase * 2) % 2 == 0)[..., None]
    return Image.fromarray(np.where(on, first, second).astype(np.uint8))


def render_scene(seed: int, index: int, spec: SceneSpec) -> tuple[Image.Image, np.ndarray, int]:
    """One scene: the RGB image, its boolean object mask ``(H, W)`` and its class index into :data:`CLASS_NAMES`."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASS_NAMES)))
    fill, shape = FILLS[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
    side = spec.image_size * SUPERSAMPLE
    canvas = _background(rng, side)
    # Drawn only in cue worlds, so that worlds without the cue keep their scenes exactly.
    cue = CUE_COLOURS[label] if spec.class_cue > 0 and rng.random() < spec.class_cue else None
    _draw_clutter(ImageDraw.Draw(canvas), rng, spec, cue)
    size = rng.uniform(*spec.object_size) * SUPERSAMPLE
    x0, y0 = rng.uniform(0, side - size, size=2)
    silhouette = _shape_mask(shape, (x0, y0, x0 + size, y0 + size), side, rng.uniform(0, 2 * np.pi))
    canvas.paste(_texture(fill, rng, side, spec.stripe_period), (0, 0), silhouette)
    out = (spec.image_size, spec.image_size)
    image = canvas.resize(out, Image.Resampling.BOX)
    mask = np.asarray(silhouette.resize(out, Image.Resampling.BOX)) >= 128
    return image, mask, label


def make_scenes(seed: int, count: int, spec: SceneSpec, start: int = 0) -> datasets.Dataset:
    """`count` scenes with indices ``start .. start + count - 1`` as a dataset with ``image``, ``mask``, ``label``.

    ``label`` is a `ClassLabel` over :data:`CLASS_NAMES`; ``mask`` is an 'L' image (255 on the object).
    """
    if count < 1:
        raise ValueError(f"count={count} must be a positive number of scenes.")
    images, masks, labels = [], [], []
    for index in range(start, start + count):
        image, mask, label = render_scene(seed, index, spec)
        images.append(image)
        masks.append(Image.fromarray(mask.astype(np.uint8) * 255))
        labels.append(label)
    features = datasets.Features(
        {"image": datasets.Image(), "mask": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
    )
    return datasets.Dataset.from_dict({"image": images, "mask": masks, "label": labels}, features=features)
