"""The side-by-side saliency figure: rows are images; columns are the image, then each model's map per method.

Drawn with Pillow alone (no plotting library): each map is scaled from its minimum to its 99th percentile (so one
extreme pixel does not wash out the rest, and a nearly flat attention map still shows its structure), clipped to
[0, 1] and coloured with a black-red-yellow-white ramp. The PNG is saved with a 256-colour palette to stay small.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .registry import MAP_METHODS

# Anchor colours of the heat ramp at 0, 1/3, 2/3 and 1 (black -> red -> yellow -> white).
_RAMP = torch.tensor([[0, 0, 0], [200, 30, 0], [255, 200, 0], [255, 255, 255]], dtype=torch.float32) / 255


def colorize(saliency_map: torch.Tensor, quantile: float = 0.99) -> torch.Tensor:
    """RGB image ``(3, H, W)`` in [0, 1] of a map ``(H, W)``: values scaled from the map's minimum (0) to its
    `quantile` (1), clipped to [0, 1], through the heat ramp. A constant map comes out black."""
    values = saliency_map.detach().float()
    low, high = values.min(), torch.quantile(values.flatten(), quantile)
    if high <= low:
        high = values.max()
    values = ((values - low) / (high - low)).clamp(0, 1) if high > low else torch.zeros_like(values)
    position = values * (len(_RAMP) - 1)
    low = position.floor().long().clamp(max=len(_RAMP) - 2)
    weight = (position - low).unsqueeze(-1)
    rgb = _RAMP[low] * (1 - weight) + _RAMP[low + 1] * weight
    return rgb.permute(2, 0, 1)


def _tile(image: torch.Tensor, cell: int) -> Image.Image:
    """A ``cell``-pixel square PIL image of ``(3, H, W)`` in [0, 1] (bilinear, antialiased when shrinking)."""
    resized = F.interpolate(image.unsqueeze(0).float(), size=(cell, cell), mode="bilinear", antialias=True)[0]
    array = (resized.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def _method_label(method: str) -> str:
    """The registered method's short label (the name itself for an unregistered one)."""
    return MAP_METHODS[method].label if method in MAP_METHODS else method


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def saliency_grid(
    pixels: torch.Tensor,
    maps: Mapping[tuple[str, str], torch.Tensor],
    models: Sequence[str],
    methods: Sequence[str],
    path: str | os.PathLike,
    cell: int = 96,
    titles: Sequence[str] | None = None,
) -> None:
    """Write the grid as PNG: one row per image, columns ``image | m1 map | m2 map | …`` for each method.

    Args:
        pixels: ``(N, 3, H, W)`` images in [0, 1].
        maps: ``(method, model) -> (N, H, W)`` saliency maps.
        models, methods: column order (models vary fastest, so base and AFT sit side by side).
        path: output PNG path.
        cell: side of each tile in pixels.
        titles: optional row titles (e.g. class names), drawn under each image.
    """
    missing = [(m, model) for m in methods for model in models if (m, model) not in maps]
    if missing:
        raise ValueError(f"No maps for {missing}; compute every (method, model) pair shown in the grid.")
    font = ImageFont.load_default(size=max(10, cell // 9))
    header = 2 * (font.size + 3) + 4
    columns = 1 + len(methods) * len(models)
    rows = pixels.shape[0]
    canvas = Image.new("RGB", (columns * cell, header + rows * cell), "white")
    draw = ImageDraw.Draw(canvas)
    width_chars = max(4, int(cell / (0.55 * font.size)))
    draw.text((4, 2), "image", fill="black", font=font)
    for j, (method, model) in enumerate((m, model) for m in methods for model in models):
        x = (1 + j) * cell + 4
        draw.text((x, 2), _short(_method_label(method), width_chars), fill="black", font=font)
        label = os.path.basename(os.path.normpath(model)) or model
        draw.text((x, font.size + 5), _short(label, width_chars), fill="dimgray", font=font)
    for i in range(rows):
        y = header + i * cell
        canvas.paste(_tile(pixels[i], cell), (0, y))
        if titles is not None:
            draw.text(
                (3, y + cell - font.size - 5),
                _short(titles[i], width_chars),
                fill="white",
                font=font,
                stroke_width=1,
                stroke_fill="black",
            )
        for j, (method, model) in enumerate((m, model) for m in methods for model in models):
            canvas.paste(_tile(colorize(maps[method, model][i]), cell), ((1 + j) * cell, y))
    # Fast octree spends the palette more evenly than median cut: the photos keep their tones next to the heat maps.
    canvas.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
