"""Interpretability evaluation of CLIP image encoders: saliency maps, their metrics, zero-shot accuracy.

Compare a base and an AFT encoder side by side with :func:`evaluate_models` (``recipes/evaluate.py``), or use the
parts: :func:`saliency` for maps, :mod:`.metrics` / :mod:`.faithfulness` / :mod:`.roar` for their scores,
:mod:`.zero_shot` and :mod:`.robustness` for accuracy, :mod:`.results` for the results file, and
:func:`evaluate_module_path` for the same metrics as local `evaluate` modules.
"""

from .evaluate_modules import EVALUATE_MODULES, evaluate_module_path
from .faithfulness import blur, curve_auc, faithfulness_curve
from .figures import saliency_grid
from .metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou, top_fraction_mask
from .results import METRICS, SCHEMA, load_results, save_results, summary_markdown, validate_results
from .roar import ROAR_FRACTIONS, remove_top_pixels, roar_accuracy, train_linear_probe
from .robustness import robust_predictions
from .saliency import SALIENCY_METHODS, class_similarity, saliency
from .suite import EvaluationArguments, evaluate_models, load_clip, run_evaluation
from .vit_maps import attention_rollout
from .zero_shot import (
    PROMPT_TEMPLATES,
    ZERO_SHOT_PRESETS,
    class_text_embeddings,
    top1_accuracy,
    zero_shot_predictions,
)

__all__ = [
    "EVALUATE_MODULES",
    "METRICS",
    "PROMPT_TEMPLATES",
    "ROAR_FRACTIONS",
    "SALIENCY_METHODS",
    "SCHEMA",
    "ZERO_SHOT_PRESETS",
    "EvaluationArguments",
    "attention_rollout",
    "blur",
    "class_similarity",
    "class_text_embeddings",
    "curve_auc",
    "energy_pointing_game",
    "evaluate_models",
    "evaluate_module_path",
    "faithfulness_curve",
    "gini_index",
    "load_clip",
    "load_results",
    "pointing_game",
    "remove_top_pixels",
    "roar_accuracy",
    "robust_predictions",
    "run_evaluation",
    "saliency",
    "saliency_grid",
    "save_results",
    "summary_markdown",
    "top1_accuracy",
    "top_fraction_iou",
    "top_fraction_mask",
    "train_linear_probe",
    "validate_results",
    "zero_shot_predictions",
]
