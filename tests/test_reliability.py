"""Reliability and security: a matrix of bad inputs and faults, each with its exact outcome.

Every case asserts either a clear error (its message matched) or a logged skip with the run completing, and that no
partial or secret-bearing file is left behind. One short training run (tiny CLIP, batch 1, 4 steps, a fake
``HF_TOKEN`` in the environment) is shared by the cases that need a trained output folder.
"""

import errno
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants as hub_constants
from PIL import Image
from transformers import AutoConfig, CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection, Trainer
from transformers.trainer_utils import get_last_checkpoint

from hf_clip_aft import AFTConfig, AFTTrainer
from hf_clip_aft.cli import parse_args
from hf_clip_aft.commands import train as train_command
from hf_clip_aft.convert import convert_open_clip_visual
from hf_clip_aft.data import AFTDataCollator, load_image_dataset, open_image
from hf_clip_aft.release.card import render_card
from hf_clip_aft.release.export import export_clip
from hf_clip_aft.release.hub import check_push_access
from hf_clip_aft.release.record import TrainingRecord
from hf_clip_aft.trainer import check_output_dir

TINY = str(Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets" / "tiny-clip")
FAKE_TOKEN = "hf_" + "Fake" * 9  # shaped like a Hub token; must never reach a file
LEFTOVER_MARKERS = (".partial-", ".staging-", ".write-test-")


# --- helpers -----------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


GOOD = png_bytes(Image.new("RGB", (70, 70), (200, 30, 30)))
BROKEN = {  # name -> file contents that do not decode
    "zero-byte.jpg": b"",
    "truncated.png": GOOD[: len(GOOD) // 2],
    "not-an-image.jpg": b"this is text, not a JPEG\n",
}


def image_dataset(folder: Path, names_and_bytes: dict[str, bytes]) -> datasets.Dataset:
    """An image dataset of files written to `folder` (paths, so that messages can name them)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in names_and_bytes.items():
        (folder / name).write_bytes(data)
        paths.append({"path": str(folder / name), "bytes": None})
    features = datasets.Features({"image": datasets.Image(decode=False)})
    return datasets.Dataset.from_dict({"image": paths}, features=features)


def run_args(output_dir: Path, **overrides) -> AFTConfig:
    values = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        max_steps=4,
        per_device_train_batch_size=1,
        learning_rate=1e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        attack_steps=1,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    values.update(overrides)
    return AFTConfig(**values)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def assert_clean(folder: Path) -> None:
    """No staging/partial leftover under `folder`, and the fake token in no file (binary files included)."""
    leftovers = [p for p in folder.rglob("*") if any(m in p.name for m in LEFTOVER_MARKERS)] if folder.exists() else []
    assert leftovers == []
    secret = FAKE_TOKEN.encode()
    assert [p for p in files_under(folder) if secret in p.read_bytes()] == []


class Messages(logging.Handler):
    """Collects the library's log messages (module-scoped runs cannot use caplog)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of 4 steps at batch 1 over 3 unreadable files and 1 good one, checkpoints every 2 steps, with a fake
    HF_TOKEN in the environment; then a resume from checkpoint-2 into the same folder. Yields what the cases read."""
    root = tmp_path_factory.mktemp("run")
    dataset = image_dataset(root / "images", {**BROKEN, "good.png": GOOD})
    messages = Messages()
    logging.getLogger("hf_clip_aft").addHandler(messages)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_TOKEN", FAKE_TOKEN)
            first = AFTTrainer(TINY, args=run_args(root / "out"), train_dataset=dataset)
            first.train()
            first.save_model()
            first_record = TrainingRecord.load(root / "out")
            checkpoint_2_state = json.loads((root / "out" / "checkpoint-2" / "trainer_state.json").read_text())
            resumed = AFTTrainer(TINY, args=run_args(root / "out"), train_dataset=dataset)
            resumed.train(resume_from_checkpoint=str(root / "out" / "checkpoint-2"))
            latest = AFTTrainer(TINY, args=run_args(root / "out"), train_dataset=dataset)
            latest.train(resume_from_checkpoint=True)
    finally:
        logging.getLogger("hf_clip_aft").removeHandler(messages)
    yield {
        "root": root,
        "out": root / "out",
        "first": first,
        "first_record": first_record,
        "checkpoint_2_skipped": checkpoint_2_state["stateful_callbacks"]["SkippedImages"]["args"]["total"],
        "resumed": resumed,
        "latest": latest,
        "log": "\n".join(messages.lines),
    }


# --- configuration: a clear error before any compute -------------------------------------------------------------

CONFIG_CASES = {
    # id: (config file values, exception type, message pattern)
    "yaml-attack-steps-float": ({"attack_steps": 2.5}, TypeError, r"attack_steps=2\.5 has type float; expected int"),
    "yaml-attack-norm-int": ({"attack_norm": 3}, TypeError, r"attack_norm=3 has type int; expected str"),
    "yaml-output-dir-list": ({"output_dir": ["a"]}, TypeError, r"output_dir=\['a'\] has type list; expected str"),
    "yaml-lora-rank-float": ({"lora_r": 4.5}, TypeError, r"lora_r=4\.5 has type float; expected int"),
    "attack-eps-zero": ({"attack_eps": 0}, ValueError, r"attack_eps=0 \(no attack, ε = 0\).*allow_no_op=True"),
    "attack-steps-zero": ({"attack_steps": 0}, ValueError, r"attack_steps=0 \(no attack, K = 0\).*allow_no_op"),
    "learning-rate-zero": ({"learning_rate": 0}, ValueError, r"learning_rate=0 \(no weight update\).*allow_no_op"),
    "learning-rate-negative": (
        {"learning_rate": -1e-5},
        ValueError,
        r"learning_rate=-1e-05 is invalid: it must be ≥ 0",
    ),
    "hub-token": ({"hub_token": FAKE_TOKEN}, ValueError, r"hub_token is refused.*hf auth login.*HF_TOKEN"),
}


@pytest.mark.parametrize("values, error, message", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_configuration_is_refused_at_start_up(tmp_path, values, error, message):
    config = tmp_path / "config.yaml"
    output_dir = tmp_path / "out"
    config.write_text(yaml.safe_dump({"model_name_or_path": TINY, "output_dir": str(output_dir), **values}))
    with pytest.raises(error, match=message) as raised:
        parse_args(train_command.ARGUMENTS, [str(config)])
    assert FAKE_TOKEN not in str(raised.value)  # the refusal of a token never echoes it
    assert not output_dir.exists()


def test_a_yaml_string_that_is_no_number_is_named(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "learning_rate": "fast"}))
    with pytest.raises(SystemExit):
        parse_args(train_command.ARGUMENTS, [str(config)])
    error = capsys.readouterr().err
    assert "argument --learning_rate" in error and "invalid float value: 'fast'" in error


def test_no_op_run_is_allowed_by_flag_and_carded_as_not_aft(tmp_path):
    args = AFTConfig(output_dir=str(tmp_path / "out"), attack_eps=0, allow_no_op=True)
    card = render_card(TrainingRecord.from_config(args, base_model="tiny-clip")).content
    assert "**This model is not adversarially fine-tuned.** It was trained with attack_eps=0 (no attack, ε = 0)" in card
    assert "not adversarially" not in render_card(TrainingRecord.from_config(run_args(tmp_path / "o"))).content


@pytest.mark.parametrize("value", [True, "true"], ids=["yaml-true", "flag-true"])
def test_resume_true_means_the_latest_checkpoint(tmp_path, value):
    args = AFTConfig(output_dir=str(tmp_path / "out"), resume_from_checkpoint=value)
    assert args.resume_target() is True
    assert AFTConfig(output_dir=str(tmp_path), resume_from_checkpoint="out/checkpoint-2").resume_target() == (
        "out/checkpoint-2"
    )


# --- images: converted correctly, or skipped with a logged reason --------------------------------------------------


def exif_rotated_jpeg() -> bytes:
    """A 40 × 20 JPEG whose EXIF orientation (6: rotate 90° clockwise to view) makes it 20 × 40 upright."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.info["transparency"] = 0  # index 0 (black) is transparent
    return image


def tiff_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "TIFF")
    return buffer.getvalue()


CONVERSION_CASES = {
    # id: (what the image column holds, expected (width, height), expected RGB of pixel (0, 0))
    "png-16-bit": (png_bytes(Image.fromarray(np.full((8, 8), 257 * 100, np.uint16))), (8, 8), (100, 100, 100)),
    "png-16-bit-white": (png_bytes(Image.fromarray(np.full((8, 8), 65535, np.uint16))), (8, 8), (255, 255, 255)),
    "cmyk-tiff": (tiff_bytes(Image.new("CMYK", (8, 8), (255, 0, 0, 0))), (8, 8), (0, 255, 255)),
    "palette-transparent": (png_bytes(palette_with_transparency()), (4, 4), (255, 255, 255)),
    "la-transparent": (png_bytes(Image.new("LA", (8, 8), (0, 0))), (8, 8), (255, 255, 255)),
    "la-opaque": (png_bytes(Image.new("LA", (8, 8), (60, 255))), (8, 8), (60, 60, 60)),
    "rgba-half": (png_bytes(Image.new("RGBA", (8, 8), (0, 0, 0, 128))), (8, 8), (127, 127, 127)),
    "grayscale": (png_bytes(Image.new("L", (8, 8), 77)), (8, 8), (77, 77, 77)),
    "exif-rotated-jpeg": (exif_rotated_jpeg(), (20, 40), None),
}


@pytest.mark.parametrize("data, size, pixel", CONVERSION_CASES.values(), ids=CONVERSION_CASES.keys())
def test_image_modes_become_upright_8_bit_rgb(data, size, pixel):
    image = open_image({"bytes": data, "path": None})
    assert image.mode == "RGB" and image.size == size
    if pixel is not None:
        assert image.getpixel((0, 0)) == pixel


def bomb_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 70 × 70 image is then over twice the limit


SKIP_CASES = {
    # id: (file contents, setup, logged reason)
    "zero-byte": (BROKEN["zero-byte.jpg"], None, "cannot identify image file"),
    "truncated": (BROKEN["truncated.png"], None, "truncated"),
    "text-with-image-extension": (BROKEN["not-an-image.jpg"], None, "cannot identify image file"),
    "decompression-bomb": (GOOD, bomb_limit, "could be decompression bomb DOS attack"),
    "float-image": (tiff_bytes(Image.new("F", (8, 8), 0.5)), None, "32-bit float image (mode F)"),
}


@pytest.mark.parametrize("data, setup, reason", SKIP_CASES.values(), ids=SKIP_CASES.keys())
def test_unreadable_image_is_skipped_with_its_reason(
    tiny_processor, tmp_path, caplog, monkeypatch, data, setup, reason
):
    if setup is not None:
        setup(monkeypatch)
    bad = tmp_path / "bad-file"
    bad.write_bytes(data)
    good = {"image": {"path": None, "bytes": png_bytes(Image.new("RGB", (20, 20)))}}
    collate = AFTDataCollator(tiny_processor.image_processor)
    with caplog.at_level(logging.WARNING, logger="hf_clip_aft"):
        batch = collate([{"image": {"path": str(bad), "bytes": None}}, good])
    assert batch["pixel_values"].shape[0] == 1 and batch["num_skipped"].sum().item() == 1
    skipped = [r.getMessage() for r in caplog.records if "Skipping an unreadable image" in r.getMessage()]
    assert len(skipped) == 1 and str(bad) in skipped[0] and reason in skipped[0]


def test_batches_of_only_broken_files_never_end_the_run(trained):
    first = trained["first"]
    assert first.state.global_step == 4  # 3 of the 4 batches of one image each held a broken file
    assert trained["first_record"].skipped_images == 3
    for name in BROKEN:
        assert f"{name}): " in trained["log"]  # each skip is logged with the file
    losses = [entry["loss"] for entry in first.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert_clean(trained["root"])


def test_skipped_total_survives_resume_by_path_and_by_true(trained):
    assert 1 <= trained["checkpoint_2_skipped"] <= 2  # some broken files came before the checkpoint
    for trainer in (trained["resumed"], trained["latest"]):
        assert trainer.state.global_step == 4
        assert trainer.training_record().skipped_images == 3
    saved = json.loads((trained["out"] / "checkpoint-4" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["SkippedImages"]["args"]["total"] == 3
    assert TrainingRecord.load(trained["out"] / "checkpoint-4").skipped_images == 3


def test_no_file_holds_the_token_and_only_safetensors_weights(trained):
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert FAKE_TOKEN not in trained["log"]
    assert_clean(trained["root"])  # every written file, the pickled training_args.bin included


# --- datasets ------------------------------------------------------------------------------------------------------


def only_broken(tmp_path):
    return image_dataset(tmp_path / "images", BROKEN)


def empty(tmp_path):
    return image_dataset(tmp_path / "images", {})


def wrong_column(tmp_path):
    return image_dataset(tmp_path / "images", {"good.png": GOOD}).rename_column("image", "picture")


def no_image_column(tmp_path):
    return datasets.Dataset.from_dict({"path": ["a.jpg"], "label": [0]})


DATASET_CASES = {
    "nothing-decodes": (
        only_broken,
        {},
        ValueError,
        r"None of the images in column 'image' decodes; the first failures: position 0 \(.*zero-byte\.jpg\): "
        r"cannot identify image file",
    ),
    "empty": (empty, {}, ValueError, r"The train dataset is empty"),
    "wrong-image-column": (
        wrong_column,
        {"image_column": "image"},
        ValueError,
        r"image_column='image' is not a column",
    ),
    "no-image-column": (no_image_column, {}, ValueError, r"No column of type Image among \['path', 'label'\]"),
}


@pytest.mark.parametrize("make, kwargs, error, message", DATASET_CASES.values(), ids=DATASET_CASES.keys())
def test_bad_dataset_stops_before_training(tmp_path, make, kwargs, error, message):
    dataset = make(tmp_path)
    with pytest.raises(error, match=message):
        AFTTrainer(TINY, args=run_args(tmp_path / "out"), train_dataset=dataset, **kwargs)
    assert files_under(tmp_path / "out") == []


def csv_file(tmp_path):
    (tmp_path / "data.csv").write_text("path,label\na.jpg,0\n")
    return tmp_path / "data.csv"


def csv_folder(tmp_path):
    (tmp_path / "only-csv").mkdir()
    (tmp_path / "only-csv" / "data.csv").write_text("path,label\na.jpg,0\n")
    return tmp_path / "only-csv"


DATASET_SOURCE_CASES = {
    "csv-file": (csv_file, ValueError, r"data\.csv' is a file; it must be a Hub dataset id or a folder of images"),
    "folder-of-csv": (csv_folder, ValueError, r"only-csv' holds no image files \(found: \['\.csv'\]\)"),
    "missing-folder": (lambda tmp: tmp / "nope", FileNotFoundError, r"No dataset folder at .*nope"),
}


@pytest.mark.parametrize("make, error, message", DATASET_SOURCE_CASES.values(), ids=DATASET_SOURCE_CASES.keys())
def test_bad_dataset_source_is_named(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        load_image_dataset(str(make(tmp_path)))


# --- models and checkpoint files ----------------------------------------------------------------------------------


def garbage_safetensors_model(tmp_path):
    shutil.copytree(TINY, tmp_path / "model")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x00garbage" * 8)
    return str(tmp_path / "model")


MODEL_CASES = {
    "missing-local-path": (
        lambda tmp: str(tmp / "no-such-model"),
        FileNotFoundError,
        r"No model folder at .*no-such-model.*not a Hub id",
    ),
    "relative-missing-path": (
        lambda tmp: "./models/clip",
        FileNotFoundError,
        r"No model folder at './models/clip'",
    ),
    "garbage-safetensors-model": (
        garbage_safetensors_model,
        ValueError,
        r"model\.safetensors is not a readable safetensors",
    ),
    "file-instead-of-folder": (
        lambda tmp: TINY + "/config.json",
        ValueError,
        r"config\.json' is a file; a model is a folder",
    ),
}


@pytest.mark.parametrize("make, error, message", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_bad_model_source_is_named(tmp_path, photos_dataset, make, error, message):
    with pytest.raises(error, match=message):
        AFTTrainer(make(tmp_path), args=run_args(tmp_path / "out"), train_dataset=photos_dataset)
    assert not (tmp_path / "out").exists()


class NotATensor:
    """A pickled object that weights_only=True refuses."""


def write_checkpoint(tmp_path, name, contents):
    path = tmp_path / name
    if isinstance(contents, bytes):
        path.write_bytes(contents)
    else:
        torch.save(contents, path)
    return path


CHECKPOINT_CASES = {
    "garbage-pt": ("model.pt", bytes(range(256)) * 4, r"model\.pt is not a readable PyTorch checkpoint"),
    "zero-byte-bin": ("model.bin", b"", r"model\.bin is not a readable PyTorch checkpoint \(EOFError\)"),
    "pickled-object-pt": ("model.pt", {"w": NotATensor()}, r"model\.pt holds Python objects besides tensors"),
    "garbage-safetensors": ("model.safetensors", b"garbage" * 10, r"model\.safetensors is not a readable safetensors"),
}


@pytest.mark.parametrize("name, contents, message", CHECKPOINT_CASES.values(), ids=CHECKPOINT_CASES.keys())
def test_bad_checkpoint_file_is_refused_without_unpickling(tmp_path, name, contents, message):
    path = write_checkpoint(tmp_path, name, contents)
    with pytest.raises(ValueError, match=message) as raised:
        convert_open_clip_visual(path, base=TINY)
    assert "weights_only=False" not in str(raised.value) and raised.value.__cause__ is None


# --- the Hub -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offline", [False, True], ids=["unreachable-hub", "offline-mode"])
def test_unreachable_hub_is_a_clear_message(monkeypatch, offline):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises(ConnectionError, match=r"the Hugging Face Hub \(.*\) cannot be reached") as raised:
        check_push_access("org/model", token=FAKE_TOKEN)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no raw httpx traceback
    assert FAKE_TOKEN not in str(raised.value)


# --- output folders and saves --------------------------------------------------------------------------------------


def users_folder(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text("{}")
    return folder


def test_a_folder_of_someone_elses_files_is_refused(tmp_path):
    folder = users_folder(tmp_path)
    with pytest.raises(
        FileExistsError, match=r"already holds files this library did not write \(README\.md, config\.json\)"
    ):
        check_output_dir(folder)
    assert (folder / "README.md").read_text() == "my notes" and sorted(os.listdir(folder)) == [
        "README.md",
        "config.json",
    ]
    check_output_dir(folder, overwrite=True)  # --overwrite_output_dir
    assert sorted(os.listdir(folder)) == ["README.md", "config.json"]


def in_unprivileged_child(function) -> str:
    """Run `function` in a forked child (as `nobody` when we are root, who ignores permissions); its error text."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            function()
            text = "no error"
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            text = f"{type(err).__name__}: {err}"
        os.write(write, text.encode())
        os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 4096):
        chunks.append(chunk)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


def test_read_only_output_folder_is_a_clear_error():
    folder = Path(tempfile.mkdtemp(prefix="aft-read-only-"))
    try:
        folder.chmod(0o555)
        message = in_unprivileged_child(lambda: check_output_dir(folder))
        assert message.startswith(f"PermissionError: Cannot write to output_dir='{folder}' (Permission denied)")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)
        shutil.rmtree(folder)


def test_output_folder_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PermissionError, match=r"Cannot write to output_dir=.*a-file/out' \(Not a directory\)"):
        check_output_dir(tmp_path / "a-file" / "out")


def one_step_trainer(tmp_path, model=TINY):
    dataset = image_dataset(tmp_path / "images", {"good.png": GOOD})
    return AFTTrainer(model, args=run_args(tmp_path / "out", max_steps=1, save_steps=1), train_dataset=dataset)


def test_disk_full_during_a_checkpoint_leaves_nothing_and_says_so(tmp_path, monkeypatch):
    def full(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_rng_state", full)
    trainer = one_step_trainer(tmp_path)
    with pytest.raises(OSError, match=r"No space left on the device of .*out while writing checkpoint-1: free space"):
        trainer.train()
    assert sorted(os.listdir(tmp_path / "out")) == []


def test_a_checkpoint_killed_mid_save_is_never_resumed_and_is_cleaned(tmp_path, monkeypatch):
    def killed(self, output_dir):
        raise KeyboardInterrupt  # the process stops between the weights and the RNG state

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_rng_state", killed)
        with pytest.raises(KeyboardInterrupt):
            one_step_trainer(tmp_path).train()
    out = tmp_path / "out"
    assert not (out / "checkpoint-1").exists() and get_last_checkpoint(str(out)) is None
    assert (out / ".partial-checkpoint-1" / "checkpoint-1" / "model.safetensors").is_file()  # what was written
    one_step_trainer(tmp_path)  # the next run removes it
    assert os.listdir(out) == []


def test_nan_loss_stops_the_run_before_any_checkpoint(tmp_path):
    model = CLIPVisionModelWithProjection.from_pretrained(TINY)
    with torch.no_grad():
        model.visual_projection.weight[0, 0] = float("nan")  # every embedding, hence the loss, is NaN
    trainer = one_step_trainer(tmp_path, model=model)
    with pytest.raises(FloatingPointError, match=r"The AFT loss is nan at step 1: the run stops here"):
        trainer.train()
    assert os.listdir(tmp_path / "out") == []


def test_export_killed_mid_swap_leaves_no_loadable_mix_and_is_cleaned(tmp_path, monkeypatch):
    tower = CLIPVisionModelWithProjection.from_pretrained(TINY)
    out = export_clip(tower, TINY, tmp_path / "export")
    (out / "checkpoint-7").mkdir()  # training state that shares the folder must survive
    moves = []

    def replace_then_die(self, target):
        moves.append(self.name)
        if len(moves) == 2:
            raise KeyboardInterrupt
        return os.replace(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", replace_then_die)
        patch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing up
        with pytest.raises(KeyboardInterrupt):
            export_clip(tower, TINY, out)
    assert moves[-1] != "config.json" and not (out / "config.json").exists()  # config.json comes in last
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoConfig.from_pretrained(out)  # so the half-swapped folder does not load as a model
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.staging-")]

    export_clip(tower, TINY, out)  # the next export removes the leftover staging folder and completes
    CLIPModel.from_pretrained(out)
    assert (out / "checkpoint-7").is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert_clean(tmp_path)


def test_new_export_appears_with_one_rename(tmp_path, monkeypatch):
    renames = []
    original = Path.rename
    monkeypatch.setattr(
        Path, "rename", lambda self, target: renames.append(Path(target).name) or original(self, target)
    )
    tower = CLIPVisionModelWithProjection.from_pretrained(TINY)
    (tmp_path / ".export-a1b2c3d4").mkdir()  # an earlier version's staging folder, left by a killed export
    export_clip(tower, TINY, tmp_path / "export")
    assert renames == ["export"] and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


# --- evaluation inputs: no silent wrong number (issue 24) --------------------------------------------------------


def _localisation(mask: np.ndarray, saliency_map: torch.Tensor):
    """The evaluation's localisation scorer on one 64 x 64 image (tiny-clip's size) with `mask` and `saliency_map`;
    returns ``({metric: value}, notes)``."""
    from hf_clip_aft.interpret import EvaluationArguments
    from hf_clip_aft.interpret.registry import BatchContext, RunContext
    from hf_clip_aft.interpret.scorers import LocalizationScorer

    processor = CLIPProcessor.from_pretrained(TINY).image_processor
    run = RunContext(EvaluationArguments(models=["m"], dataset="d"), ["simple_gradient"], ["a", "b"], "mask", (), 0)
    scorer = LocalizationScorer(run)
    batch = BatchContext(index=0, model_name="m", model=None, image_processor=processor, embed=None,
                         pixels=torch.zeros(1, 3, 64, 64), labels=torch.zeros(1, dtype=torch.long),
                         mask_images=[Image.fromarray(mask)], image_embeds=None, class_embeds=None, predictions=None,
                         text_embeds=None, method="simple_gradient", maps=saliency_map[None])  # fmt: skip
    scores = {score.metric: score.values for score in scorer.update(batch)}
    scorer.results()
    return {name: values.tolist() for name, values in scores.items()}, " ".join(scorer.notes)


def _peak_off_the_object() -> torch.Tensor:
    """A map whose peak (10) lies on rows 0-7, its second level (1) on the object (rows 24-39), 0 elsewhere."""
    saliency_map = torch.zeros(64, 64)
    saliency_map[:8] = 10.0
    saliency_map[24:40] = 1.0
    return saliency_map


def _mask(top: int, object_value: int = 1) -> np.ndarray:
    """0 background, `object_value` on rows 24-39, and 255 (unannotated) on rows 0-`top`."""
    mask = np.zeros((64, 64), np.uint8)
    mask[24:40] = object_value
    mask[:top] = 255
    return mask


MASK_CASES = {  # mask -> (localisation scores, or None when the image is skipped; words of the note)
    "all-unannotated": (np.full((64, 64), 255, np.uint8), None, "1 with no annotated pixel"),
    # The map's peak lies on unannotated pixels: left out, the peak among the annotated ones is on the object, and
    # the mass on them is not counted against the map.
    "peak-on-unannotated": (_mask(8), {"pointing_game": [1.0], "energy_pointing_game": [1.0]}, ""),
    "peak-on-background": (_mask(0), {"pointing_game": [0.0], "energy_pointing_game": [16 / (16 + 80)]}, ""),
    "binary-0-255": (_mask(0, object_value=255), None, "store it as 1"),
}


@pytest.mark.parametrize("mask, expected, note", MASK_CASES.values(), ids=MASK_CASES.keys())
def test_unannotated_mask_pixels_are_left_out_of_localisation(mask, expected, note):
    scores, notes = _localisation(mask, _peak_off_the_object())
    if expected is None:
        assert all(values == [] for values in scores.values()) and note in notes
    else:
        assert notes == ""
        for name, values in expected.items():
            assert scores[name] == pytest.approx(values), name


def test_a_mask_of_another_size_than_its_image_is_refused_naming_the_row(tmp_path):
    from hf_clip_aft.interpret.batches import EvaluationData, iterate_batches

    rows = {"image": [], "mask": [], "label": [0, 0]}
    for i, mask_size in enumerate([(80, 80), (80, 40)]):
        Image.new("RGB", (80, 80)).save(tmp_path / f"{i}.png")
        Image.new("L", mask_size).save(tmp_path / f"{i}_mask.png")
        rows["image"].append({"path": str(tmp_path / f"{i}.png"), "bytes": None})
        rows["mask"].append({"path": str(tmp_path / f"{i}_mask.png"), "bytes": None})
    features = datasets.Features({"image": datasets.Image(decode=False), "mask": datasets.Image(decode=False),
                                  "label": datasets.ClassLabel(names=["a"])})  # fmt: skip
    data = EvaluationData(datasets.Dataset.from_dict(rows, features=features), "image", "label", "mask", ["a"])
    with pytest.raises(ValueError, match=r"mask of row 1 \(.*1\.png\) is 80x40 pixels but its image is 80x80"):
        list(iterate_batches(data, batch_size=2))


def test_a_16_bit_png_through_the_page_equals_its_8_bit_version(tmp_path):
    from hf_clip_aft.app.comparison import compare, comparison_figure
    from hf_clip_aft.app.comparison import open_image as page_image
    from hf_clip_aft.interpret import load_clip

    values = np.random.default_rng(0).integers(0, 256, (48, 64), dtype=np.uint16)
    Image.fromarray(values.astype(np.uint8)).save(tmp_path / "8-bit.png")
    Image.fromarray(values * 257).save(tmp_path / "16-bit.png")  # 0-65535, what a scientific camera writes
    with Image.open(tmp_path / "16-bit.png") as raw:
        assert raw.mode.startswith("I") and (np.asarray(raw.convert("RGB")) == 255).mean() > 0.99  # PIL's: white
    eight, sixteen = page_image(tmp_path / "8-bit.png"), page_image(tmp_path / "16-bit.png")
    assert np.array_equal(np.asarray(eight), np.asarray(sixteen))
    model = load_clip(TINY, "cpu")
    figures = [comparison_figure(compare(image, [model], ["cat", "dog"], ["attention"])) for image in (eight, sixteen)]
    assert np.array_equal(np.asarray(figures[0]), np.asarray(figures[1]))
    # compare() given the 16-bit image itself converts it the same way (no white image).
    direct = compare(Image.open(tmp_path / "16-bit.png"), [model], ["cat", "dog"], ["attention"])
    assert np.array_equal(np.asarray(comparison_figure(direct)), np.asarray(figures[0]))


def test_the_package_opens_images_through_one_function():
    """No module but hf_clip_aft.data opens an image file or converts to RGB with PIL's plain conversion."""
    package = Path(__file__).resolve().parents[1] / "hf_clip_aft"
    offenders = []
    for path in package.rglob("*.py"):
        if path == package / "data.py":
            continue
        text = path.read_text()
        if "Image.open(" in text or '.convert("RGB")' in text:
            offenders.append(str(path.relative_to(package)))
    assert offenders == []


HOSTILE_REPO_IDS = {  # argument -> value that is no Hub repository id
    "parent-path": ("repo_id", "../x"),
    "absolute-path": ("repo_id", "/tmp/x"),
    "three-parts": ("repo_id", "a/b/c"),
    "double-dash": ("repo_id", "org/x--y"),
    "home-path": ("repo_id", "~/x"),
    "space-absolute": ("space", "/etc"),
    "space-parent": ("space", "../x"),
    "space-no-namespace": ("space", "demo"),
}


@pytest.mark.parametrize("argument, value", HOSTILE_REPO_IDS.values(), ids=HOSTILE_REPO_IDS.keys())
def test_push_refuses_hostile_repo_ids_before_anything(tmp_path, monkeypatch, argument, value):
    from hf_clip_aft.commands import push
    from hf_clip_aft.release import hub

    monkeypatch.setattr(hub, "HfApi", lambda *a, **k: pytest.fail("the Hub was contacted"))
    checkpoint = tmp_path / "run"
    checkpoint.mkdir()
    values = {"checkpoint": str(checkpoint), "repo_id": "org/clip-aft", "dry_run": True, argument: value}
    with pytest.raises(ValueError, match=rf"--{argument}={value!r} is not a Hub repository id"):
        push.main(push.PushArguments(**values))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no -hub or -space folder


def test_llava_explain_given_a_clip_folder_names_it(tmp_path):
    from hf_clip_aft.cli import run_command

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    argv = ["--llava", TINY, "--vision", TINY, "--images", str(tmp_path / "images"), "--output", str(tmp_path / "o")]
    with pytest.raises(TypeError, match=rf"--llava '{TINY}'.*CLIPModel.*the AFT CLIP goes to --vision"):
        run_command("llava_explain", argv)
    assert not (tmp_path / "o").exists()
