"""Named CLIP architectures, buildable offline with random weights.

The ViT shapes are those of the OpenAI checkpoints on the Hub; building them from a config needs no download, which
is what the benchmarks and the tests use. ``tiny`` is the architecture of the demo model shipped in
``hf_clip_aft/assets/tiny-clip`` (see ``recipes/make_tiny_clip.py``).
"""

from __future__ import annotations

from transformers import CLIPConfig

# (vision hidden, layers, heads, patch, image size, projection dim, text hidden, text layers, text heads)
_ARCHS: dict[str, tuple[int, int, int, int, int, int, int, int, int]] = {
    "tiny": (32, 2, 2, 16, 64, 16, 32, 2, 2),
    "vit-b-16": (768, 12, 12, 16, 224, 512, 512, 12, 8),
    "vit-b-32": (768, 12, 12, 32, 224, 512, 512, 12, 8),
    "vit-l-14": (1024, 24, 16, 14, 224, 768, 768, 12, 12),
    "vit-l-14-336": (1024, 24, 16, 14, 336, 768, 768, 12, 12),
}

# The Hub checkpoint each named architecture corresponds to (used in docs and model cards only).
HUB_IDS = {
    "vit-b-16": "openai/clip-vit-base-patch16",
    "vit-b-32": "openai/clip-vit-base-patch32",
    "vit-l-14": "openai/clip-vit-large-patch14",
    "vit-l-14-336": "openai/clip-vit-large-patch14-336",
}

TINY_VOCAB_SIZE = 514  # 256 byte symbols, the same 256 with the end-of-word suffix, and 2 special tokens


def clip_config(name: str) -> CLIPConfig:
    """The `CLIPConfig` of a named architecture: one of ``tiny``, ``vit-b-16``, ``vit-b-32``, ``vit-l-14``,
    ``vit-l-14-336``."""
    if name not in _ARCHS:
        raise ValueError(f"Unknown architecture {name!r}; choose one of {sorted(_ARCHS)}.")
    v_hidden, v_layers, v_heads, patch, image, proj, t_hidden, t_layers, t_heads = _ARCHS[name]
    text = dict(
        hidden_size=t_hidden,
        intermediate_size=4 * t_hidden,
        num_hidden_layers=t_layers,
        num_attention_heads=t_heads,
        projection_dim=proj,
    )
    if name == "tiny":
        # The tiny byte-level tokenizer: <|startoftext|> and <|endoftext|> come after the 512 byte symbols.
        text.update(vocab_size=TINY_VOCAB_SIZE, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(
        hidden_size=v_hidden,
        intermediate_size=4 * v_hidden,
        num_hidden_layers=v_layers,
        num_attention_heads=v_heads,
        patch_size=patch,
        image_size=image,
        projection_dim=proj,  # CLIPVisionModelWithProjection reads the projection size from the vision config
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
