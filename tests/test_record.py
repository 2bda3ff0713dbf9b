"""The training record (save/load, atomic, public names only) and the direction of the package's imports."""

import json
import subprocess
import sys

import pytest

from hf_clip_aft import files as files_module
from hf_clip_aft.config import AFTConfig
from hf_clip_aft.release.export import private_strings
from hf_clip_aft.release.record import LEGACY_RECORD_NAME, RECORD_NAME, TrainingRecord


@pytest.fixture
def record(tmp_path) -> TrainingRecord:
    args = AFTConfig(output_dir=str(tmp_path / "run"), report_to="none", attack_eps=8, bf16=False)
    return TrainingRecord.from_config(
        args,
        base_model=str(tmp_path / "models" / "tiny-clip"),
        dataset_name=str(tmp_path / "data" / "photos"),
        train_runtime=12.5,
        hardware="1 × CPU",
        global_steps=3,
        skipped_images=1,
    )


def test_record_round_trips_and_names_no_local_path_or_token(record, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)  # whatever the environment holds never reaches the file
    folder = tmp_path / "export"
    folder.mkdir()
    path = record.save(folder)
    assert path == folder / RECORD_NAME and [p.name for p in folder.iterdir()] == [RECORD_NAME]
    assert TrainingRecord.load(folder) == record
    saved = json.loads(path.read_text())
    assert (saved["base_model"], saved["base_model_on_hub"], saved["dataset"]) == ("tiny-clip", False, "photos")
    assert saved["hyperparameters"]["attack_eps"] == 8 and saved["budget_unit"] == "1/255"
    assert (saved["skipped_images"], saved["global_steps"], saved["train_runtime_s"]) == (1, 3, 12.5)
    assert saved["hyperparameters"]["precision"] == "fp32" and saved["versions"]["hf_clip_aft"]
    text = path.read_text()
    assert str(tmp_path) not in text and "hf_xxx" not in text
    assert private_strings(folder) == []


def test_record_save_is_atomic(record, tmp_path, monkeypatch):
    record.save(tmp_path)
    before = (tmp_path / RECORD_NAME).read_text()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        TrainingRecord(global_steps=99).save(tmp_path)
    assert (tmp_path / RECORD_NAME).read_text() == before  # the old record is untouched
    assert [p.name for p in tmp_path.iterdir()] == [RECORD_NAME]  # and no temporary file is left behind


def test_record_reads_an_older_export_and_refuses_other_json(record, tmp_path):
    legacy = {k: v for k, v in record.to_dict().items() if k not in ("skipped_images", "budget_unit")}
    (tmp_path / LEGACY_RECORD_NAME).write_text(json.dumps({**legacy, "schema": "hf_clip_aft.training/v1"}))
    loaded = TrainingRecord.load(tmp_path)
    assert loaded.base_model == "tiny-clip" and loaded.skipped_images is None and loaded.global_steps == 3
    assert TrainingRecord.load(tmp_path / "nothing-here") is None
    (tmp_path / RECORD_NAME).write_text(json.dumps({"schema": "hf_clip_aft.eval/v1"}))
    with pytest.raises(ValueError, match="hf_clip_aft.training/v2"):
        TrainingRecord.load(tmp_path)


def test_with_sources_keeps_what_is_not_given(record):
    renamed = record.with_sources(base_model="openai/clip-vit-base-patch16")
    assert (renamed.base_model, renamed.base_model_on_hub) == ("openai/clip-vit-base-patch16", True)
    assert renamed.dataset == record.dataset and renamed.hyperparameters == record.hyperparameters


def test_training_never_imports_the_evaluation_package():
    check = (
        "import sys, hf_clip_aft, hf_clip_aft.trainer, hf_clip_aft.release;"
        "bad = [m for m in sys.modules if m.startswith('hf_clip_aft.interpret')]; assert not bad, bad;"
        "hf_clip_aft.saliency; assert 'hf_clip_aft.interpret' in sys.modules"  # lazily there on first use
    )
    subprocess.run([sys.executable, "-c", check], check=True)
