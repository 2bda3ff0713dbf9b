"""hf_clip_aft: adversarial fine-tuning (AFT) of CLIP image encoders for visual interpretability."""

from .attack import adversarial_perturbation
from .config import AFTConfig
from .convert import convert_open_clip_visual
from .export import export_clip
from .trainer import AFTTrainer

__all__ = ["AFTConfig", "AFTTrainer", "adversarial_perturbation", "convert_open_clip_visual", "export_clip"]
__version__ = "0.1.0"
