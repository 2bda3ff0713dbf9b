"""Model cards and Hub pushes, up to the network boundary (HfApi is replaced by a recording fake)."""

import hashlib
import importlib
import json
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError
from PIL import Image

from hf_clip_aft.config import AFTConfig
from hf_clip_aft.release import CardOptions, TrainingRecord, hub
from hf_clip_aft.release.card import read_eval_report, render_card, write_card
from hf_clip_aft.release.export import export_clip, private_strings
from test_export import TINY, fine_tuned_tower

BASE_ID = "openai/clip-vit-base-patch16"


def eval_report(tmp_path: Path, ours: str, malformed: bool = False) -> Path:
    """An evaluation report in the suite's schema, with local paths where a user's would have them."""
    report = {
        "schema": "hf_clip_aft.eval/v1",
        "dataset": {"name": str(tmp_path / "photos"), "config": None, "split": "train", "num_images": 8},
        "models": [BASE_ID, ours],
        "settings": {"seed": 0, "limit": None, "metrics": ["accuracy", "insertion_auc"],
                     "methods": ["simple_gradient"], "batch_size": 8},
        "results": [
            {"model": BASE_ID, "task": "zero-shot-image-classification", "metric": "accuracy", "method": None,
             "value": 0.5, "settings": {"attack_eps": 0}},
            {"model": ours, "task": "zero-shot-image-classification", "metric": "accuracy", "method": None,
             "value": 0.625, "settings": {"attack_eps": 0}},
            {"model": ours, "task": "saliency", "metric": "insertion_auc", "method": "simple_gradient",
             "value": 0.3125, "settings": {}},
        ],
    }  # fmt: skip
    if malformed:
        report["results"].append({"model": ours, "task": "saliency", "metric": "deletion_auc"})  # no value
    path = tmp_path / "results.json"
    path.write_text(json.dumps(report))
    return path


@pytest.fixture
def args(tmp_path) -> AFTConfig:
    return AFTConfig(output_dir=str(tmp_path / "run"), report_to="none", per_device_train_batch_size=64)


@pytest.fixture
def published(tmp_path, args) -> Path:
    """An export with its card, as the trainer's final save writes it."""
    record = TrainingRecord.from_config(
        args, base_model=TINY, dataset_name=str(tmp_path / "photos"), train_runtime=12.5, hardware="1 × CPU",
        global_steps=3,
    )  # fmt: skip
    folder = export_clip(fine_tuned_tower(), TINY, tmp_path / "export", record=record)
    write_card(folder, record, options=CardOptions(license="mit"))
    return folder


def test_card_parses_back_with_its_model_index_and_names_no_local_path(tmp_path, args):
    report = eval_report(tmp_path, ours=str(tmp_path / "export"))
    record = TrainingRecord.from_config(
        args, base_model=BASE_ID, dataset_name="ILSVRC/imagenet-1k", train_runtime=7380.0, hardware="8 × GPU",
    )  # fmt: skip
    card = render_card(record, read_eval_report(report), CardOptions(repo_id="org/clip-aft-vit-b-16", license="mit"))
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert (data.library_name, data.pipeline_tag, data.base_model, data.license) == (
        "transformers", "zero-shot-image-classification", BASE_ID, "mit",
    )  # fmt: skip
    assert {"clip", "adversarial-training", "interpretability"} <= set(data.tags)
    assert data.datasets == ["ILSVRC/imagenet-1k"]  # the local evaluation folder is not a Hub dataset
    results = {(r.task_type, r.metric_type): r.metric_value for r in data.eval_results}
    assert results == {("zero-shot-image-classification", "accuracy"): 0.625, ("saliency", "insertion_auc"): 0.3125}
    assert {r.dataset_name for r in data.eval_results} == {"photos"}
    text = (tmp_path / "README.md").read_text()
    assert str(tmp_path) not in text
    needles = (
        "ε = 4/255", "α = 1/255", "K = 10", "σ = 1/255", "η = 1/255", "β₂ = 0.95", "1e-05", "2 h 03 min", "8 × GPU",
        "64 images = 64 per device × 1 accumulation steps × 1 process", "Gong, Shizhan", "CLIPVisionModel",
    )  # fmt: skip
    for needle in needles:
        assert needle in text, needle


def test_card_without_results_has_no_numbers(published):
    text = (published / "README.md").read_text()
    assert "model-index" not in text and "No evaluation results" in text
    assert ModelCard.load(published / "README.md").data.eval_results is None
    summary = json.loads((published / "training_record.json").read_text())
    assert summary["base_model"] == "tiny-clip" and summary["base_model_on_hub"] is False
    assert summary["hyperparameters"]["attack_eps"] == 4.0
    assert private_strings(published) == []


def test_eval_report_is_read_through_the_suite_schema(tmp_path):
    report = read_eval_report(eval_report(tmp_path, ours="mine"))
    assert len(report["results"]) == 3
    with pytest.raises(ValueError, match=r"results\[3\]"):  # a malformed entry is named, not published
        read_eval_report(eval_report(tmp_path, ours="mine", malformed=True))
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="hf_clip_aft.eval/v1"):
        read_eval_report(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="eval_model"):  # two candidates when the base is not named
        render_card(TrainingRecord(), report)
    card = render_card(TrainingRecord(), report, CardOptions(eval_model="mine"))
    assert len(card.data.eval_results) == 2


class FakeHfApi:
    """Records the calls that would reach the Hub; snapshots the folder at upload time."""

    calls: list = []
    fail: dict = {}

    def __init__(self, token=None):
        assert token is None  # the recipes rely on the logged-in token; none is passed around

    def _call(self, name, *args, **kwargs):
        FakeHfApi.calls.append((name, args, kwargs))
        if name in FakeHfApi.fail:
            raise FakeHfApi.fail[name]

    def whoami(self):
        self._call("whoami")
        return {"name": "someone"}

    def create_repo(self, repo_id, **kwargs):
        self._call("create_repo", repo_id, **kwargs)
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"someone/{repo_id}"})()

    def auth_check(self, repo_id, **kwargs):
        self._call("auth_check", repo_id, **kwargs)

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        snapshot = {
            p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*")
            if p.is_file()
        }
        self._call("upload_folder", snapshot=snapshot, **kwargs)
        return type("CommitInfo", (), {"commit_url": "https://huggingface.co/org/x/commit/0"})()


@pytest.fixture
def fake_api(monkeypatch):
    FakeHfApi.calls, FakeHfApi.fail = [], {}
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_dry_run_validates_and_contacts_nobody(published, fake_api):
    assert hub.push_folder(published, "org/clip-aft", dry_run=True) is None
    assert fake_api.calls == []
    names = [name for name, _ in hub.upload_listing(published)]
    assert names == sorted(["README.md", "training_record.json", "config.json", "model.safetensors",
                            "preprocessor_config.json", "tokenizer.json",
                            "tokenizer_config.json"])  # fmt: skip


def test_push_uploads_exactly_the_validated_folder_in_one_commit(published, fake_api):
    before = {
        p.relative_to(published).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in published.rglob("*")
        if p.is_file()
    }
    hub.push_folder(published, "org/clip-aft", private=True)
    assert [name for name, *_ in fake_api.calls] == ["create_repo", "upload_folder"]
    _, (repo,), create = fake_api.calls[0]
    assert repo == "org/clip-aft" and create == {"private": True, "exist_ok": True}
    _, _, upload = fake_api.calls[1]
    assert Path(upload["folder_path"]) == published and upload["repo_id"] == "org/clip-aft"
    assert upload["snapshot"] == before
    assert not {"allow_patterns", "ignore_patterns", "path_in_repo"} & set(upload)


def test_push_refuses_a_folder_that_is_not_publishable(published, fake_api):
    (published / "optimizer.pt").write_bytes(b"state")
    with pytest.raises(ValueError, match="optimizer.pt"):
        hub.push_folder(published, "org/clip-aft")
    (published / "optimizer.pt").unlink()
    (published / "README.md").unlink()
    with pytest.raises(ValueError, match="README.md"):
        hub.push_folder(published, "org/clip-aft")
    assert fake_api.calls == []


def forbidden(url: str) -> HfHubHTTPError:
    return HfHubHTTPError("403 Forbidden", response=httpx2.Response(403, request=httpx2.Request("GET", url)))


def test_check_push_access(fake_api):
    assert hub.check_push_access("clip-aft") == "someone/clip-aft"
    assert ("create_repo", ("clip-aft",), {"private": None, "exist_ok": True}) in fake_api.calls
    assert ("auth_check", ("someone/clip-aft",), {"write": True}) in fake_api.calls

    fake_api.fail = {"whoami": LocalTokenNotFoundError("no token")}
    with pytest.raises(PermissionError, match=r"'org/clip-aft'.*hf auth login.*HF_TOKEN"):
        hub.check_push_access("org/clip-aft")
    fake_api.fail = {"auth_check": forbidden("https://huggingface.co/api/models/org/clip-aft/auth-check/write")}
    with pytest.raises(PermissionError, match=r"someone cannot write to the model repo 'org/clip-aft'"):
        hub.check_push_access("org/clip-aft")


def load_recipe(name: str):
    """The command module behind ``recipes/<name>.py`` (its ``ARGUMENTS`` dataclasses and ``main``)."""
    return importlib.import_module(f"hf_clip_aft.commands.{name}")


def test_push_recipe_dry_run_from_a_training_output_folder(published, tmp_path, fake_api, capsys):
    # A training output folder holds checkpoints and trainer state next to the export: none of it is published.
    (published / "checkpoint-3").mkdir()
    (published / "checkpoint-3" / "optimizer.pt").write_bytes(b"state")
    (published / "trainer_state.json").write_text("{}")
    report = eval_report(tmp_path, ours=str(published))
    Image.new("RGB", (8, 4)).save(report.parent / "saliency_grid.png")  # recipes/evaluate.py's figure
    recipe = load_recipe("push")
    recipe.main(recipe.PushArguments(
        checkpoint=str(published), repo_id="org/clip-aft", dry_run=True, eval_results=str(report),
        base_model=BASE_ID, license="mit",
    ))  # fmt: skip
    out = Path(f"{published}-hub")
    printed = capsys.readouterr().out
    assert "would upload to org/clip-aft" in printed and "model.safetensors" in printed
    assert "checkpoint-3" not in printed and not (out / "trainer_state.json").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == BASE_ID and len(card.data.eval_results) == 2
    assert "org/clip-aft" in card.text and "1 × CPU" in card.text  # the training record survived re-export
    assert (out / "saliency_comparison.png").is_file() and "](saliency_comparison.png)" in card.text
    assert fake_api.calls == []


def test_trainer_checks_access_at_init_and_pushes_the_validated_export(tmp_path, fake_api):
    from conftest import PHOTOS
    from hf_clip_aft import AFTTrainer
    from hf_clip_aft.data import load_image_dataset
    from hf_clip_aft.trainer import HUB_FOLDER

    fake_api.fail = {"auth_check": forbidden("https://huggingface.co/api/models/org/clip-aft-tiny/auth-check/write")}
    args = AFTConfig(
        output_dir=str(tmp_path / "run"),
        report_to="none",
        use_cpu=True,
        max_steps=1,
        per_device_train_batch_size=4,
        attack_steps=1,
        save_strategy="no",
        push_to_hub=True,
        hub_model_id="org/clip-aft-tiny",
    )
    dataset = load_image_dataset(PHOTOS)
    with pytest.raises(PermissionError, match="cannot write to the model repo 'org/clip-aft-tiny'"):  # before training
        AFTTrainer(TINY, args=args, train_dataset=dataset)
    assert [c[0] for c in fake_api.calls] == ["whoami", "create_repo", "auth_check"]

    fake_api.calls, fake_api.fail = [], {}
    trainer = AFTTrainer(TINY, args=args, train_dataset=dataset, dataset_name="ILSVRC/imagenet-1k")
    trainer.train()
    trainer.save_model()
    uploads = [c for c in fake_api.calls if c[0] == "upload_folder"]
    assert len(uploads) == 1
    kwargs = uploads[0][2]
    folder = Path(kwargs["folder_path"])
    assert folder == Path(args.output_dir) / HUB_FOLDER and kwargs["repo_id"] == "org/clip-aft-tiny"
    # Exactly the validated folder went up: our card (not transformers' generic one) with the model.
    assert kwargs["snapshot"] == {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }
    assert {"README.md", "model.safetensors", "config.json"} <= set(kwargs["snapshot"])
    card = ModelCard.load(folder / "README.md")
    assert card.data.datasets == ["ILSVRC/imagenet-1k"] and "adversarial-training" in card.data.tags
    assert str(tmp_path) not in (folder / "README.md").read_text()
