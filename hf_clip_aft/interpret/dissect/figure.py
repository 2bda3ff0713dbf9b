"""The dissection figure: each model's best CLIP-Dissect units with their label, its score and their own top images."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ...data import open_image
from ...files import atomic_write
from .constants import METHOD_CLIP_DISSECT
from .probe import ProbeData
from .summary import model_label


def figure_units(entry: dict[str, Any], count: int, images: int) -> list[dict[str, Any]]:
    """The `count` units of a CLIP-Dissect layer entry to show: labelled units first, then by similarity, each
    with a different set of top `images` images (units that share their top images with a shown unit get the same
    label score from the same images, so they would repeat a row)."""
    described = [u for u in entry["units"] if u["concept"] is not None]
    chosen, seen = [], set()
    for unit in sorted(described, key=lambda u: (not u["labelled"], -u["similarity"])):
        key = frozenset(unit["top_images"][:images])
        if key not in seen:
            seen.add(key)
            chosen.append(unit)
        if len(chosen) == count:
            break
    return chosen


def top_images_figure(
    results: dict[str, Any],
    probe: ProbeData,
    path: str,
    units: int = 4,
    images: int = 5,
    cell: int = 80,
) -> None:
    """PNG of each model's `units` best CLIP-Dissect units of its last dissected layer (:func:`figure_units`): one
    row per unit, titled with its label, the label's similarity and the null's threshold, then the unit's own top
    `images` probe images, most activating first."""
    similarity = results["settings"]["similarity"]
    rows = []
    position = {row: i for i, row in enumerate(probe.rows)}
    for model in results["models"]:
        entries = [e for e in results["layers"] if e["model"] == model and e["method"] == METHOD_CLIP_DISSECT]
        entry = entries[-1]
        threshold = entry["summary"]["threshold"]
        for unit in figure_units(entry, units, images):
            verdict = "labelled" if unit["labelled"] else "below the null"
            title = (
                f"{model_label(model)} L{entry['layer']} unit {unit['unit']}: {unit['concept']!r}, {similarity} "
                f"{unit['similarity']:.3g} (null {threshold:.3g}, {verdict})"
            )
            rows.append((title, unit["top_images"][:images]))
    font = ImageFont.load_default(size=12)
    line = font.size + 6
    width = max([images * cell] + [int(font.getlength(title)) + 6 for title, _ in rows])
    canvas = Image.new("RGB", (width, max(1, len(rows)) * (cell + line)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, shown) in enumerate(rows):
        y = r * (cell + line)
        draw.text((3, y + 2), title, fill="black", font=font)
        for c, row in enumerate(shown):
            image = open_image(probe.image(position[row]))
            canvas.paste(ImageOps.fit(image, (cell, cell)), (c * cell, y + line))
    atomic_write(path, lambda temporary: canvas.save(temporary, format="PNG", optimize=True))
