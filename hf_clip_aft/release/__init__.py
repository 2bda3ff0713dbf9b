"""Release steps after training, all reading the run's :class:`TrainingRecord`.

:mod:`.record` (what the run was, saved once by the trainer), :mod:`.export` (the drop-in `CLIPModel` folder and its
checks), :mod:`.card` (README.md from the record and an evaluation report), :mod:`.hub` (access check and the one-commit
push), :mod:`.checkpoints` (the training run's atomic checkpoint folders and mid-run pushes), :mod:`.trainer_outputs`
(`AFTTrainer`'s checkpoints, record, export and push, as a mixin), :mod:`.llava` (an AFT tower inside a LLaVA),
:mod:`.names` (what a public file may call a model or dataset).
Only :func:`.card.read_eval_report` imports the evaluation package, when a card has results to show.
"""

from .card import (
    CardOptions,
    check_card,
    read_eval_report,
    render_card,
    render_llava_card,
    write_card,
)
from .export import export_checkpoint, export_clip, validate_export
from .hub import check_push_access, push_checkpoint, push_folder
from .llava import save_llava, swap_llava_vision_tower
from .record import TrainingRecord

__all__ = [
    "CardOptions",
    "TrainingRecord",
    "check_card",
    "check_push_access",
    "export_checkpoint",
    "export_clip",
    "push_checkpoint",
    "push_folder",
    "read_eval_report",
    "render_card",
    "render_llava_card",
    "save_llava",
    "swap_llava_vision_tower",
    "validate_export",
    "write_card",
]
