"""Checkpoint I/O (hf_clip_aft.release.checkpoints): full-disk messages and the saved best-checkpoint path."""

import errno
import json
import os

import pytest
import torch

from hf_clip_aft import AFTTrainer
from hf_clip_aft.release.checkpoints import is_disk_full
from test_trainer import make_args

# torch.save's zip writer reports a short write (a full disk) like this.
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304"


@pytest.mark.parametrize(
    ("error", "full"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (RuntimeError(TORCH_SHORT_WRITE), True),
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: "
                "file write failed"
            ),
            True,
        ),
        (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"), False),
        (OSError(errno.EACCES, "Permission denied"), False),
        (RuntimeError("CUDA out of memory"), False),
    ],
)
def test_what_counts_as_a_full_disk(error, full):
    assert is_disk_full(error) is full


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(TORCH_SHORT_WRITE)],
    ids=["ENOSPC", "torch-short-write"],
)
def test_a_full_disk_during_a_checkpoint_says_so_and_leaves_nothing(tmp_path, tiny_clip_path, photos_dataset, error):
    """torch.save (the optimiser state) fails as on a full disk: the documented message, the original chained."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise error
        return real_save(obj, f, *args, **kwargs)

    trainer = AFTTrainer(
        tiny_clip_path,
        args=make_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=photos_dataset,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", save)
        with pytest.raises(OSError, match=r"No space left on the device of .*out while writing checkpoint-1") as info:
            trainer.train()
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is error
    assert os.listdir(tmp_path / "out") == []


def test_the_saved_best_checkpoint_is_the_final_folder(tmp_path, tiny_clip_path, photos_dataset):
    """Every checkpoint's trainer_state.json names the best checkpoint by its final path, never the staging one,
    including the checkpoint that is itself the best when it is written."""
    args = make_args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model="loss",
        per_device_eval_batch_size=4,
    )
    trainer = AFTTrainer(tiny_clip_path, args=args, train_dataset=photos_dataset, eval_dataset=photos_dataset)
    trainer.train()
    out = tmp_path / "out"
    for step in (2, 4):
        saved = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        best = saved["best_model_checkpoint"]
        assert ".partial-" not in best and os.path.isdir(best), best
        assert best == trainer.state.best_model_checkpoint or step == 2
    first = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert first["best_model_checkpoint"] == str(out / "checkpoint-2")  # the best when written: itself
