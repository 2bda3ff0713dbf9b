"""hf_clip_aft: adversarial fine-tuning (AFT) of CLIP image encoders for visual interpretability."""

from importlib import import_module
from importlib.metadata import version

from .attack import adversarial_perturbation
from .config import AFTConfig
from .convert import convert_open_clip_visual
from .release import (
    CardOptions,
    TrainingRecord,
    check_push_access,
    export_checkpoint,
    export_clip,
    push_folder,
    render_card,
    render_llava_card,
    save_llava,
    swap_llava_vision_tower,
    validate_export,
    write_card,
)
from .trainer import AFTTrainer

__version__ = version("hf_clip_aft")

# The evaluation package is imported on first use (PEP 562), so that training never loads it.
_INTERPRET_NAMES = ("EvaluationArguments", "evaluate_models", "load_results", "saliency")


def __getattr__(name: str):
    if name in _INTERPRET_NAMES:
        return getattr(import_module(".interpret", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AFTConfig",
    "AFTTrainer",
    "CardOptions",
    "EvaluationArguments",
    "TrainingRecord",
    "adversarial_perturbation",
    "check_push_access",
    "convert_open_clip_visual",
    "evaluate_models",
    "export_checkpoint",
    "export_clip",
    "load_results",
    "push_folder",
    "render_card",
    "render_llava_card",
    "saliency",
    "save_llava",
    "swap_llava_vision_tower",
    "validate_export",
    "write_card",
]
