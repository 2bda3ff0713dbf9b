"""hf_clip_aft: adversarial fine-tuning (AFT) of CLIP image encoders for visual interpretability."""

from .attack import adversarial_perturbation
from .config import AFTConfig
from .convert import convert_open_clip_visual
from .export import export_clip
from .interpret import EvaluationArguments, evaluate_models, load_results, saliency
from .trainer import AFTTrainer

__all__ = [
    "AFTConfig",
    "AFTTrainer",
    "EvaluationArguments",
    "adversarial_perturbation",
    "convert_open_clip_visual",
    "evaluate_models",
    "export_clip",
    "load_results",
    "saliency",
]
__version__ = "0.1.0"
