"""Interpretability evaluation of CLIP image encoders: saliency maps, their metrics, zero-shot accuracy.

Compare a base and an AFT encoder side by side with :func:`evaluate_models` (``recipes/evaluate.py``), or use the
parts: :mod:`.registry` for the map methods, metrics and metric groups' scorers (one entry each), :func:`saliency`
for maps, :mod:`.metrics` / :mod:`.faithfulness` / :mod:`.roar` for their scores,
:mod:`.zero_shot` and :mod:`.robustness` for accuracy, :mod:`.results` for the results file, and
:func:`evaluate_module_path` for the same metrics as local `evaluate` modules.
"""

from .evaluate_modules import EVALUATE_MODULES, evaluate_module_path
from .faithfulness import blur, curve_auc, faithfulness_curve
from .figures import saliency_grid
from .metrics import energy_pointing_game, gini_index, pointing_game, top_fraction_iou, top_fraction_mask
from .registry import (
    MAP_METHODS,
    METRICS,
    SCORERS,
    BatchContext,
    MapMethod,
    Metric,
    RunContext,
    Score,
    Scorer,
    get_map_method,
    get_metric,
    get_scorer,
    metric_groups,
    register_map_method,
    register_metric,
    register_scorer,
)
from .results import SCHEMA, load_results, save_results, summary_markdown, validate_results
from .roar import ROAR_FRACTIONS, remove_top_pixels, roar_accuracy, train_linear_probe
from .robustness import robust_predictions
from .saliency import class_similarity, saliency
from .segmentation import class_iou, confusion_matrix, mean_iou, segmentation_predictions
from .suite import EvaluationArguments, evaluate_models, load_clip, run_evaluation
from .surgery import DENSE_METHODS, clip_surgery_features, dense_maps, feature_surgery, patched_attention
from .vit_maps import attention_rollout
from .zero_shot import (
    PROMPT_TEMPLATES,
    ZERO_SHOT_PRESETS,
    class_text_embeddings,
    top1_accuracy,
    zero_shot_predictions,
)


def __getattr__(name: str) -> tuple[str, ...]:
    # SALIENCY_METHODS: the registered map methods' names, read when asked for (a view, not a second list).
    if name == "SALIENCY_METHODS":
        return tuple(MAP_METHODS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "EVALUATE_MODULES",
    "MAP_METHODS",
    "METRICS",
    "PROMPT_TEMPLATES",
    "ROAR_FRACTIONS",
    "SALIENCY_METHODS",
    "SCHEMA",
    "SCORERS",
    "ZERO_SHOT_PRESETS",
    "BatchContext",
    "EvaluationArguments",
    "MapMethod",
    "Metric",
    "RunContext",
    "Score",
    "Scorer",
    "attention_rollout",
    "blur",
    "class_similarity",
    "class_text_embeddings",
    "curve_auc",
    "energy_pointing_game",
    "evaluate_models",
    "evaluate_module_path",
    "faithfulness_curve",
    "get_map_method",
    "get_metric",
    "get_scorer",
    "gini_index",
    "load_clip",
    "load_results",
    "metric_groups",
    "pointing_game",
    "register_map_method",
    "register_metric",
    "register_scorer",
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
    # training-free maps (surgery.py) and segmentation metrics (segmentation.py)
    "DENSE_METHODS",
    "class_iou",
    "clip_surgery_features",
    "confusion_matrix",
    "dense_maps",
    "feature_surgery",
    "mean_iou",
    "patched_attention",
    "segmentation_predictions",
]
