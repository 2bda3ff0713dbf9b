"""The side-by-side saliency figure: rows are images; columns are the image, then each model's map per method.

Drawn with Pillow alone (no plotting library): each map is scaled from its minimum to its 99th percentile (so one
extreme pixel does not wash out the rest, and a nearly flat attention map still shows its structure), clipped to
[0, 1] and coloured with a black-red-yellow-white ramp; a colour bar under the grid says so. Every row is headed by
its title (e.g. the class whose prompt the maps explain), column headers carry the methods' full names (wrapped,
never cut), and where object masks are given their outline is drawn on the image and on every map. The PNG is saved
with a 256-colour palette to stay small.
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
# The mask outline: cyan is on none of the ramp's colours, nor on most photos.
OUTLINE_COLOUR = (0, 230, 255)
_LEGEND_NOTE = "Each map is scaled to its own range."
_OUTLINE_NOTE = " Cyan line: the object mask."


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


def mask_outline(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Boolean ``(size, size)`` outline of a boolean mask ``(H, W)`` resized to `size` pixels: the pixels where a
    3 × 3 neighbourhood holds both object and background, so the line is about two pixels wide."""
    resized = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")
    grown = F.max_pool2d(resized, 3, stride=1, padding=1)
    shrunk = -F.max_pool2d(-resized, 3, stride=1, padding=1)
    return (grown != shrunk)[0, 0]


def _to_image(rgb: torch.Tensor) -> Image.Image:
    """A PIL image of ``(3, H, W)`` in [0, 1]."""
    return Image.fromarray((rgb.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def _tile(image: torch.Tensor, cell: int, outline: torch.Tensor | None = None) -> Image.Image:
    """A ``cell``-pixel square PIL image of ``(3, H, W)`` in [0, 1] (bilinear, antialiased when shrinking), with
    `outline` (``(cell, cell)`` boolean) painted in :data:`OUTLINE_COLOUR`."""
    resized = F.interpolate(image.unsqueeze(0).float(), size=(cell, cell), mode="bilinear", antialias=True)[0]
    if outline is not None:
        resized[:, outline] = torch.tensor(OUTLINE_COLOUR, dtype=torch.float32)[:, None] / 255
    return _to_image(resized)


def _method_label(method: str) -> str:
    """The registered method's short label (the name itself for an unregistered one)."""
    return MAP_METHODS[method].label if method in MAP_METHODS else method


def display_text(text: str) -> str:
    """`text` as a figure can show it: a byte-level BPE's end-of-word mark ``</w>`` as a space, every character the
    font cannot draw (control characters, U+FFFD from a token that splits a UTF-8 sequence) as its escape, e.g.
    ``\\x01``, and runs of spaces as one. A random language model's answer then reads as its bytes, not as boxes."""
    text = text.replace("</w>", " ")
    shown = "".join(ch if ch.isprintable() and ch != "\ufffd" else ascii(ch)[1:-1] for ch in text)
    return " ".join(shown.split())


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """`text` broken into lines of at most `width` pixels in `font`: at spaces, and inside a word only when the word
    alone is wider than a line. Nothing is dropped."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
            continue
        while len(word) > 1 and font.getlength(word) > width:
            cut = 1
            while cut < len(word) - 1 and font.getlength(word[: cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def saliency_grid(
    pixels: torch.Tensor,
    maps: Mapping[tuple[str, str], torch.Tensor],
    models: Sequence[str],
    methods: Sequence[str],
    path: str | os.PathLike,
    cell: int = 96,
    titles: Sequence[str] | None = None,
    masks: torch.Tensor | None = None,
    tile_captions: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Write the grid as PNG: one row per image, columns ``image | m1 map | m2 map | …`` for each method, a colour
    bar under it. The PNG is ``cell × (1 + methods × models)`` pixels wide.

    Args:
        pixels: ``(N, 3, H, W)`` images in [0, 1].
        maps: ``(method, model) -> (N, H, W)`` saliency maps.
        models, methods: column order (models vary fastest, so base and AFT sit side by side).
        path: output PNG path.
        cell: side of each tile in pixels.
        titles: optional row titles (e.g. ``"explains: tabby cat"``), written in full above each row.
        masks: optional ``(N, H, W)`` boolean object masks (aligned with `pixels`): their outline is drawn on the
            image and on every map of the row.
        tile_captions: optional ``model -> N`` texts written on that model's maps (e.g. the class each model's maps
            explain when it differs between models, as for explanations of each model's own prediction).
    """
    missing = [(m, model) for m in methods for model in models if (m, model) not in maps]
    if missing:
        raise ValueError(f"No maps for {missing}; compute every (method, model) pair shown in the grid.")
    rows = pixels.shape[0]
    captions = {f"tile_captions[{model!r}]": texts for model, texts in (tile_captions or {}).items()}
    for name, values in {"titles": titles, "masks": masks, **captions}.items():
        if values is not None and len(values) != rows:
            raise ValueError(f"{name} has {len(values)} entries for {rows} images; give one per image.")
    font = ImageFont.load_default(size=max(11, cell // 8))
    line = font.size + 3
    columns = [(method, model) for method in methods for model in models]
    width = (1 + len(columns)) * cell
    text_width = cell - 6
    headers = [
        (wrap_text(display_text(_method_label(method)), font, text_width), wrap_text(_label(model), font, text_width))
        for method, model in columns
    ]
    method_lines = max([1, *(len(h[0]) for h in headers)])
    model_lines = max([1, *(len(h[1]) for h in headers)])
    header = (method_lines + model_lines) * line + 4
    row_titles = [wrap_text(display_text(title), font, width - 8) for title in titles or [""] * rows]
    row_heights = [cell + (len(t) * line + 2 if titles is not None else 0) for t in row_titles]
    legend_note = wrap_text(_LEGEND_NOTE + (_OUTLINE_NOTE if masks is not None else ""), font, width - 8)
    legend = (1 + len(legend_note)) * line + 14
    canvas = Image.new("RGB", (width, header + sum(row_heights) + legend), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), "image", fill="black", font=font)
    for j, (method_text, model_text) in enumerate(headers):
        x = (1 + j) * cell + 4
        for k, text in enumerate(method_text):
            draw.text((x, 2 + k * line), text, fill="black", font=font)
        for k, text in enumerate(model_text):
            draw.text((x, 2 + (method_lines + k) * line), text, fill="dimgray", font=font)
    y = header
    for i in range(rows):
        for k, text in enumerate(row_titles[i]):
            draw.text((4, y + 1 + k * line), text, fill="black", font=font)
        y += row_heights[i] - cell
        outline = None if masks is None else mask_outline(masks[i].bool(), cell)
        canvas.paste(_tile(pixels[i], cell, outline), (0, y))
        for j, (method, model) in enumerate(columns):
            x = (1 + j) * cell
            canvas.paste(_tile(colorize(maps[method, model][i]), cell, outline), (x, y))
            if tile_captions is not None and model in tile_captions:
                caption = wrap_text(display_text(tile_captions[model][i]), font, text_width)[0]
                draw.text(
                    (x + 3, y + cell - line - 2), caption, fill="white", font=font, stroke_width=1, stroke_fill="black"
                )
        y += cell
    _draw_legend(canvas, draw, font, y + 6, line, legend_note)
    # Fast octree spends the palette more evenly than median cut: the photos keep their tones next to the heat maps.
    canvas.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def _label(model: str) -> str:
    return os.path.basename(os.path.normpath(model)) or model


def _draw_legend(canvas: Image.Image, draw: ImageDraw.ImageDraw, font, y: int, line: int, note: list[str]) -> None:
    """The colour bar (each map scaled from its own minimum to its 99th percentile), then the `note` lines."""
    bar_width = min(160, canvas.width // 3)
    low, high = "map min", "99th pct"
    x = 4 + int(font.getlength(low)) + 4
    draw.text((4, y), low, fill="black", font=font)
    ramp = torch.linspace(0, 1, bar_width)[None].expand(line - 3, bar_width)
    canvas.paste(_to_image(colorize(ramp, quantile=1.0)), (x, y + 2))
    draw.text((x + bar_width + 4, y), high, fill="black", font=font)
    for k, text in enumerate(note):
        draw.text((4, y + (1 + k) * line + 2), text, fill="dimgray", font=font)
