"""AFTTrainer end to end on the tiny CLIP: losses, accumulation, precision, resume, LoRA, export, data errors."""

import shutil

import datasets
import pytest
import torch
from peft import LoraConfig
from transformers import CLIPModel

from hf_clip_aft import AFTConfig, AFTTrainer


def make_args(tmp_path, **overrides) -> AFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        attack_steps=2,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return AFTConfig(**values)


def vision_state(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def test_zero_budget_gives_zero_loss_at_initialisation(tmp_path, tiny_clip_path, photos_dataset):
    trainer = AFTTrainer(
        tiny_clip_path,
        args=make_args(tmp_path, attack_eps=0.0, allow_no_op=True, max_steps=1),
        train_dataset=photos_dataset,
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == 0.0 and first["attack_loss"] == 0.0
    assert first["cos_sim_adv"] == pytest.approx(1.0)


def test_training_moves_the_vision_tower_and_logs_metrics(tmp_path, tiny_clip_path, photos_dataset):
    trainer = AFTTrainer(tiny_clip_path, args=make_args(tmp_path, max_steps=3), train_dataset=photos_dataset)
    before = vision_state(trainer)
    trainer.train()
    after = vision_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = trainer.state.log_history[0]
    for key in ("loss", "attack_loss", "cos_sim_adv", "cos_sim_clean", "skipped_images"):
        assert key in logs
    assert logs["loss"] > 0 and logs["cos_sim_adv"] < logs["cos_sim_clean"]
    # The reference encoder never moves.
    ref = {k: v for k, v in trainer.ref_model.state_dict().items()}
    assert all(torch.equal(ref[k].float(), before[k]) for k in before)


def test_evaluate_reports_the_metrics_under_eval_names(tmp_path, tiny_clip_path, photos_dataset):
    trainer = AFTTrainer(
        tiny_clip_path,
        args=make_args(tmp_path, per_device_eval_batch_size=4),
        train_dataset=photos_dataset,
        eval_dataset=photos_dataset,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and metrics["eval_loss"] == pytest.approx(metrics["eval_attack_loss"], rel=1e-2)
    assert metrics["eval_cos_sim_adv"] < metrics["eval_cos_sim_clean"] == pytest.approx(1.0)
    assert not trainer._metrics["train"]


def test_gradient_accumulation_matches_the_large_batch(tmp_path, tiny_clip_path, photos_dataset):
    # One attack step without noise: the random start of 2 micro-batches of 2 draws the same numbers as one of 4.
    # Plain SGD: Adam would blow the float noise of the (mathematically zero) key-bias gradients up to ±lr.
    common = dict(max_steps=1, attack_steps=1, noise_sigma=0.0, clean_weight=0.5, optim="sgd", weight_decay=0.0)
    large = AFTTrainer(
        tiny_clip_path,
        args=make_args(tmp_path / "a", per_device_train_batch_size=4, **common),
        train_dataset=photos_dataset,
    )
    large.train()
    accumulated = AFTTrainer(
        tiny_clip_path,
        args=make_args(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common),
        train_dataset=photos_dataset,
    )
    accumulated.train()
    assert accumulated.state.log_history[0]["loss"] == pytest.approx(large.state.log_history[0]["loss"], rel=1e-5)
    assert_same_weights(vision_state(large), vision_state(accumulated), atol=1e-6)


def test_bf16_autocast_trains_on_cpu(tmp_path, tiny_clip_path, photos_dataset):
    trainer = AFTTrainer(tiny_clip_path, args=make_args(tmp_path, bf16=True), train_dataset=photos_dataset)
    before = vision_state(trainer)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in vision_state(trainer).items())


def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_clip_path, photos_dataset):
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = AFTTrainer(tiny_clip_path, args=make_args(tmp_path / "full", **kwargs), train_dataset=photos_dataset)
    full.train()
    # Keep only the step-2 checkpoint of a second run, then resume from it in a fresh trainer.
    interrupted = AFTTrainer(tiny_clip_path, args=make_args(tmp_path / "cut", **kwargs), train_dataset=photos_dataset)
    interrupted.train()
    shutil.rmtree(tmp_path / "cut" / "out" / "checkpoint-4")
    resumed = AFTTrainer(tiny_clip_path, args=make_args(tmp_path / "cut", **kwargs), train_dataset=photos_dataset)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    assert_same_weights(vision_state(full), vision_state(resumed), atol=1e-6)


def test_lora_changes_only_adapters_and_keeps_the_reference(tmp_path, tiny_clip_path, photos_dataset):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = AFTTrainer(
        tiny_clip_path, args=make_args(tmp_path, max_steps=3), train_dataset=photos_dataset, peft_config=lora
    )
    assert trainer.ref_model is None  # the reference is the same model with adapters disabled
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref_before = trainer.reference_embeds(trainer.model, pixels)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert torch.equal(trainer.reference_embeds(trainer.model, pixels), ref_before)
    # The adapters do change the trained encoder's output.
    with torch.no_grad():
        assert not torch.allclose(trainer._embed(trainer.model, pixels), ref_before)


def test_save_model_writes_a_drop_in_clip(tmp_path, tiny_clip_path, photos_dataset):
    trainer = AFTTrainer(tiny_clip_path, args=make_args(tmp_path), train_dataset=photos_dataset)
    trainer.train()
    trainer.save_model()
    loaded, info = CLIPModel.from_pretrained(trainer.args.output_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trainer._embed(trainer.model, pixels)
        got = trainer._embed(loaded, pixels)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # The text tower is the base's.
    base = CLIPModel.from_pretrained(tiny_clip_path)
    for key, value in base.text_model.state_dict().items():
        assert torch.equal(value, loaded.text_model.state_dict()[key])


def test_tecoa_loss_trains_with_class_labels(tmp_path, tiny_clip_path, photos_dataset):
    trainer = AFTTrainer(tiny_clip_path, args=make_args(tmp_path, loss_type="tecoa"), train_dataset=photos_dataset)
    assert trainer.text_embeds.shape == (8, 16)
    trainer.train()
    first = trainer.state.log_history[0]
    # Cross-entropy over 8 classes with near-uniform logits of a random model: around log 8, not the FARE distance.
    assert first["loss"] != pytest.approx(first["attack_loss"])
    assert first["loss"] > 0.5


def test_unreadable_images_are_skipped_and_counted(tmp_path, tiny_clip_path, photos_dataset):
    folder = tmp_path / "images" / "junk"
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for i, image in enumerate(photos_dataset["image"][:3]):
        image.convert("RGB").save(folder / f"ok{i}.jpg")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), split="train")
    trainer = AFTTrainer(tiny_clip_path, args=make_args(tmp_path, max_steps=1), train_dataset=dataset)
    trainer.train()
    assert trainer.state.log_history[0]["skipped_images"] == 1


def test_model_instances_are_accepted(tmp_path, tiny_clip, tiny_clip_path, photos_dataset):
    trainer = AFTTrainer(tiny_clip, args=make_args(tmp_path, max_steps=1), train_dataset=photos_dataset)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_clip.get_image_features(
            pixel_values=(pixels - torch.tensor(trainer.image_processor.image_mean).view(1, 3, 1, 1))
            / torch.tensor(trainer.image_processor.image_std).view(1, 3, 1, 1)
        ).pooler_output
    torch.testing.assert_close(
        trainer.reference_embeds(trainer.model, pixels), torch.nn.functional.normalize(expected, dim=-1)
    )
    with pytest.raises(TypeError, match="CLIPModel or a CLIPVisionModelWithProjection"):
        AFTTrainer(torch.nn.Linear(2, 2), args=make_args(tmp_path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attack_eps", -1.0, "attack_eps=-1.0"),
        ("attack_norm", "l1", "attack_norm='l1'"),
        ("clean_weight", 1.5, "clean_weight=1.5"),
        ("loss_type", "ce", "loss_type='ce'"),
        ("attack_eta", 0.0, "attack_eta=0.0"),
        ("remove_unused_columns", True, "remove_unused_columns=True"),
    ],
)
def test_config_rejects_bad_values_by_name(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **{field: value})
