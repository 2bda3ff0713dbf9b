"""hf_clip_aft: adversarial fine-tuning (AFT) of CLIP image encoders for visual interpretability."""

from importlib import import_module
from importlib.metadata import version

__version__ = version("hf_clip_aft")

# Every name is imported on first use (PEP 562): `import hf_clip_aft` (and so `hf-clip-aft --help`) loads neither
# torch nor transformers, and training never loads the evaluation package.
_EXPORTS = {
    "AFTConfig": ".config",
    "AFTTrainer": ".trainer",
    "CardOptions": ".release",
    "EvaluationArguments": ".interpret",
    "TrainingRecord": ".release",
    "adversarial_perturbation": ".attack",
    "check_push_access": ".release",
    "convert_open_clip_visual": ".convert",
    "evaluate_models": ".interpret",
    "export_checkpoint": ".release",
    "export_clip": ".release",
    "load_results": ".interpret",
    "push_folder": ".release",
    "render_card": ".release",
    "render_llava_card": ".release",
    "saliency": ".interpret",
    "save_llava": ".release",
    "swap_llava_vision_tower": ".release",
    "validate_export": ".release",
    "write_card": ".release",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
