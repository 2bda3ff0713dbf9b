"""hf_clip_aft: adversarial fine-tuning (AFT) of CLIP image encoders for visual interpretability."""

from .attack import adversarial_perturbation
from .config import AFTConfig
from .convert import convert_open_clip_visual
from .export import export_checkpoint, export_clip, validate_export
from .hub import check_push_access, push_folder
from .interpret import EvaluationArguments, evaluate_models, load_results, saliency
from .llava import save_llava, swap_llava_vision_tower
from .model_card import render_llava_card, render_model_card, write_model_card
from .trainer import AFTTrainer

__all__ = [
    "AFTConfig",
    "AFTTrainer",
    "EvaluationArguments",
    "adversarial_perturbation",
    "check_push_access",
    "convert_open_clip_visual",
    "evaluate_models",
    "export_checkpoint",
    "export_clip",
    "load_results",
    "push_folder",
    "render_llava_card",
    "render_model_card",
    "saliency",
    "save_llava",
    "swap_llava_vision_tower",
    "validate_export",
    "write_model_card",
]
__version__ = "0.1.0"
