"""hf_clip_aft: adversarial fine-tuning (AFT) of CLIP image encoders for visual interpretability."""

from .attack import adversarial_perturbation
from .config import AFTConfig
from .export import export_clip
from .trainer import AFTTrainer

__all__ = ["AFTConfig", "AFTTrainer", "adversarial_perturbation", "export_clip"]
__version__ = "0.1.0"
