"""The interactive comparison page: CLIP models side by side on one image (zero-shot probabilities and maps).

:mod:`.comparison` computes and draws (no web framework needed); :mod:`.page` is the Gradio page over it
(``pip install "hf_clip_aft[app]"``), started by ``recipes/app.py`` / ``hf-clip-aft app`` or, on a Space, by the
``app.py`` that :mod:`hf_clip_aft.release.space` writes.
"""

from importlib import import_module

from .comparison import (
    PROMPT_PRESETS,
    PROMPT_STYLES,
    Comparison,
    ModelResult,
    check_clip,
    compare,
    comparison_figure,
    default_methods,
    example_images,
    load_models,
    overlay,
    parse_prompts,
)

# The page needs Gradio (the [app] extra): imported on first use, so the computations work without it.
_PAGE_NAMES = ("build_app", "serve")


def __getattr__(name: str):
    if name in _PAGE_NAMES:
        try:
            page = import_module(".page", __name__)
        except ModuleNotFoundError as err:
            if err.name != "gradio":
                raise
            raise ImportError('The comparison page needs Gradio: pip install "hf_clip_aft[app]".') from err
        return getattr(page, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PROMPT_PRESETS",
    "PROMPT_STYLES",
    "Comparison",
    "ModelResult",
    "build_app",
    "check_clip",
    "compare",
    "comparison_figure",
    "default_methods",
    "example_images",
    "load_models",
    "overlay",
    "parse_prompts",
    "serve",
]
