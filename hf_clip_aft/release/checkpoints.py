"""Checkpoint I/O of a training run: the output folder check, atomic ``checkpoint-N`` folders, cleanup, mid-run pushes.

A checkpoint is written whole or not at all: the Trainer writes into the hidden ``.partial-checkpoint-N`` run folder
(:func:`checkpoint_staging`), then :func:`commit_checkpoint` points the saved state at the final folder, flushes the
files to disk and renames the folder to ``checkpoint-N``. A killed save leaves only the hidden folder, which
:func:`remove_partial_checkpoints` deletes at the next start; ``resume_from_checkpoint=true`` (the highest
``checkpoint-N``) never sees it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy, rotate_checkpoints
from transformers.utils.hub import PushInProgress

from .export import foreign_entries, fsync_dir, fsync_tree
from .hub import push_checkpoint
from .record import TrainingRecord

logger = logging.getLogger(__name__)

# A checkpoint is written under this hidden name and renamed to checkpoint-N once complete.
PARTIAL_CHECKPOINT_PREFIX = ".partial-"
TRAINER_STATE_NAME = "trainer_state.json"  # the Trainer's name for it (transformers.trainer.TRAINER_STATE_NAME)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Before any compute: `output_dir` must be writable, and hold nothing this library did not write unless
    `overwrite` (``overwrite_output_dir``), so that a user's own README.md or config.json is never replaced.

    Raises:
        FileExistsError: `output_dir` holds files of someone else's (named in the message).
        PermissionError: `output_dir` cannot be created or written to (read-only, or a file in the way).
    """
    foreign = foreign_entries(output_dir)
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"output_dir={str(output_dir)!r} already holds files this library did not write ({shown}), which the "
            "run's export would replace. Pick a new or empty folder, or pass --overwrite_output_dir true to write "
            "into it anyway."
        )
    try:
        os.makedirs(output_dir, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=output_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"Cannot write to output_dir={str(output_dir)!r} ({err.strerror or err}): pick a writable folder with "
            "--output_dir."
        ) from None


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete the ``.partial-checkpoint-*`` folders that interrupted checkpoint writes left in `output_dir`."""
    leftovers = sorted(str(p) for p in Path(output_dir).glob(f"{PARTIAL_CHECKPOINT_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"))
    for path in leftovers:
        logger.warning("Removing %s, left by an interrupted checkpoint save.", path)
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` is a write that failed for lack of space: ENOSPC / EDQUOT, or torch's zip writer stopping
    short (``[enforce fail at inline_container.cc] ... unexpected pos`` / ``file write failed``), which is how
    ``torch.save`` reports a full disk."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    if "No space left" in text or "Disk quota exceeded" in text:
        return True
    return (
        isinstance(err, RuntimeError)
        and "inline_container.cc" in text
        and ("unexpected pos" in text or "file write failed" in text)
    )


@contextmanager
def checkpoint_staging(run_dir: str, name: str, should_save: bool) -> Iterator[str]:
    """The hidden run folder (``<run_dir>/.partial-<name>``) the Trainer writes checkpoint `name` into.

    On any error the partial folder is removed (on the process that saves), and a full disk becomes an `OSError`
    (ENOSPC) saying what to do; the original error is chained.
    """
    staging = os.path.join(run_dir, PARTIAL_CHECKPOINT_PREFIX + name)
    try:
        yield staging
    except Exception as err:
        if should_save:
            shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(err):
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device of {run_dir} while writing {name}: free space there or keep fewer "
                "checkpoints (save_total_limit), then resume (resume_from_checkpoint=true) from the last "
                f"complete checkpoint. The partial {name} was removed",
            ) from err
        raise


def final_best_checkpoint(state: TrainerState, staging: str, run_dir: str) -> None:
    """Point ``state.best_model_checkpoint`` at its final folder when the Trainer recorded it under the staging name
    (the checkpoint being written is the best so far). Every rank calls it: each holds the state in memory."""
    best = state.best_model_checkpoint
    if best and os.path.commonpath([os.path.abspath(best), os.path.abspath(staging)]) == os.path.abspath(staging):
        state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging))


def commit_checkpoint(
    staging: str,
    run_dir: str,
    name: str,
    state: TrainerState,
    record: TrainingRecord,
    save_total_limit: int | None,
) -> str:
    """Publish the complete checkpoint `name` written under `staging`: main process only. Returns its final folder.

    ``trainer_state.json`` is rewritten with the final ``best_model_checkpoint`` before the rename (so that a run
    killed after it resumes with its best checkpoint), the training `record` is added, every file is flushed to
    disk, the folder is renamed to ``<run_dir>/<name>`` and old checkpoints are rotated as the Trainer would.
    """
    folder = os.path.join(staging, name)
    state.save_to_json(os.path.join(folder, TRAINER_STATE_NAME))  # the Trainer's copy names the staging path
    record.save(folder)
    fsync_tree(staging)
    final = os.path.join(run_dir, name)
    if os.path.isdir(final):  # the same step saved again (e.g. at the end of training)
        shutil.rmtree(final)
    os.rename(folder, final)
    fsync_dir(run_dir)
    shutil.rmtree(staging, ignore_errors=True)
    rotate_checkpoints(
        output_dir=run_dir,
        save_total_limit=save_total_limit,
        best_model_checkpoint=state.best_model_checkpoint,
        use_mtime=True,
    )
    return final


def push_resumable_checkpoint(
    folder: str,
    repo_id: str,
    strategy: HubStrategy | str,
    step: int,
    in_progress: PushInProgress | None,
    *,
    revision: str | None = None,
    always_push: bool = False,
) -> PushInProgress | None:
    """A mid-run push of the resumable checkpoint `folder` into its own repo sub-folder, for hub_strategy
    ``checkpoint`` (``last-checkpoint/``) and ``all_checkpoints`` (``checkpoint-N/``); nothing for ``every_save`` /
    ``end``, which push the drop-in model instead. Skipped while `in_progress` runs, unless `always_push`.

    Returns the pushes in progress afterwards (`in_progress` with this upload added).
    """
    if strategy not in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
        return in_progress
    if not always_push and in_progress is not None and not in_progress.is_done():
        return in_progress
    job = push_checkpoint(
        folder,
        repo_id,
        "last-checkpoint" if strategy == HubStrategy.CHECKPOINT else Path(folder).name,
        revision=revision,
        commit_message=f"Training in progress, step {step}",
    )
    if in_progress is None or in_progress.is_done():
        return PushInProgress([job])
    in_progress.jobs.append(job)
    return in_progress
