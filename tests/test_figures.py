"""The saliency grid teaches: full method and class names (wrapped, never cut), a colour bar, mask outlines, and
token text a figure can show."""

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from hf_clip_aft.interpret.figures import (
    OUTLINE_COLOUR,
    display_text,
    mask_outline,
    saliency_grid,
    wrap_text,
)


@pytest.fixture
def drawn(monkeypatch):
    """Every text the grid draws, in order."""
    texts = []
    original = ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        texts.append(text)
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return texts


def grid_inputs(rows=2, size=32):
    torch.manual_seed(0)
    pixels = torch.rand(rows, 3, size, size)
    maps = {(m, model): torch.rand(rows, size, size) for m in ("clip_surgery", "solid triangle area") for model in "ab"}
    return pixels, maps


def test_grid_writes_full_method_and_class_names_and_a_colour_bar(tmp_path, drawn):
    pixels, maps = grid_inputs()
    titles = ["explains: English springer spaniel", "explains: tench"]
    path = tmp_path / "grid.png"
    saliency_grid(pixels, maps, ["a", "b"], ["clip_surgery", "solid triangle area"], path, 64, titles)
    text = " ".join(drawn)
    # A 64-pixel column cannot hold these names on one line: they wrap, and every word is there.
    assert drawn[1:3] == ["CLIP", "Surgery"], drawn
    assert "solid triangle area" in text and max(len(t) for t in drawn[:12]) < len("solid triangle area"), drawn
    assert not any("…" in t for t in drawn)
    assert all(title in drawn for title in titles)  # the grid is wide enough for a row title on one line
    assert "map min" in drawn and "99th pct" in drawn and "Each map is scaled to its own range." in text
    image = Image.open(path)
    assert image.width == 64 * (1 + 2 * 2) and image.height > 2 * 64


def test_wrap_text_never_drops_characters():
    font = ImageFont.load_default(size=10)
    for text in ("CLIP Surgery", "integrated_gradients_with_a_long_name", "a b c"):
        lines = wrap_text(text, font, 40)
        assert all(font.getlength(line) <= 40 or len(line) == 1 for line in lines)
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_mask_outline_is_the_mask_border_drawn_on_every_tile(tmp_path, drawn):
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = True
    outline = mask_outline(mask, 32)
    assert outline[8, 12] and outline[23, 12] and outline[7, 12]  # both sides of the edge
    assert not outline[16, 16] and not outline[0, 0]  # inside and far outside
    pixels, maps = grid_inputs(rows=1)

    def cyan_pixels(masks) -> list[int]:  # per tile: pixels of the outline colour on the mask's left edge (x = 16)
        saliency_grid(pixels, maps, ["a", "b"], ["clip_surgery"], tmp_path / "g.png", 64, ["box"], masks=masks)
        image = Image.open(tmp_path / "g.png").convert("RGB")
        return [
            sum(
                sum(abs(a - b) for a, b in zip(image.getpixel((column * 64 + 16, y)), OUTLINE_COLOUR)) < 60
                for y in range(image.height)
            )
            for column in range(3)
        ]

    assert all(count >= 28 for count in cyan_pixels(mask[None]))  # the image and both maps: the 32-pixel edge
    assert any("Cyan line: the object mask." in t for t in drawn)
    assert cyan_pixels(None) == [0, 0, 0]


def test_tile_captions_and_lengths_are_checked(tmp_path, drawn):
    pixels, maps = grid_inputs()
    saliency_grid(pixels, maps, ["a", "b"], ["clip_surgery"], tmp_path / "g.png", tile_captions={"b": ["cat", "dog"]})
    assert "cat" in drawn and "dog" in drawn
    with pytest.raises(ValueError, match="titles has 1 entries for 2 images"):
        saliency_grid(pixels, maps, ["a", "b"], ["clip_surgery"], tmp_path / "g.png", titles=["one"])


def test_display_text_shows_token_bytes_not_boxes():
    # A random LLaVA's byte-level answer: control characters, split UTF-8 (U+FFFD) and CLIP's end-of-word mark.
    assert display_text("\x01\ufffd\ufffd</w> | \x0bq</w>#") == "\\x01\\ufffd\\ufffd | \\x0bq #"
    assert display_text("a tabby cat") == "a tabby cat"
