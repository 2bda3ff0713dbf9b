"""Performance features keep the math: precomputed reference embeddings, no host syncs, the fp16 objective scale,
activation checkpointing, and the reference forward under the run's autocast."""

from types import SimpleNamespace

import datasets
import pytest
import torch
from torch.overrides import TorchFunctionMode

import hf_clip_aft.attack as attack
from hf_clip_aft import AFTTrainer
from hf_clip_aft.modeling import encode_images, frozen_parameters
from test_trainer import assert_same_weights, make_args, vision_state

# Tensor methods that copy a value to the host, which on a GPU waits for every queued kernel.
HOST_SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero", "cpu", "numpy"}


class RefuseHostSyncs(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_SYNCS:
            raise AssertionError(f"host sync {func.__name__} inside the attack")
        return func(*args, **(kwargs or {}))


def attack_settings(norm: str) -> SimpleNamespace:
    return SimpleNamespace(
        attack_eps=64.0 if norm == "l2" else 4.0,
        attack_step_size=1.0,
        attack_steps=3,
        attack_eta=1.0,
        noise_sigma=1.0,
        attack_norm=norm,
        attack_group_size=16,
    )


@pytest.fixture
def tiny_attack(tiny_vision):
    torch.manual_seed(0)
    pixels = torch.rand(3, 3, 64, 64)
    embed = lambda x: encode_images(tiny_vision, x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # noqa: E731
    with torch.no_grad():
        target = embed(pixels)
    return tiny_vision, embed, pixels, target


@pytest.mark.parametrize("norm", attack.ATTACK_NORMS)
def test_attack_loop_makes_no_host_sync(tiny_attack, norm):
    model, embed, pixels, target = tiny_attack
    with frozen_parameters(model), RefuseHostSyncs():
        attack.adversarial_perturbation(embed, pixels, target, attack_settings(norm))


@pytest.mark.parametrize("norm", ["huber", "l2"])
def test_objective_scale_leaves_fp32_steps_bit_identical(tiny_attack, monkeypatch, norm):
    model, embed, pixels, target = tiny_attack
    runs = []
    for scale in (attack.OBJECTIVE_SCALE, 1.0):
        monkeypatch.setattr(attack, "OBJECTIVE_SCALE", scale)
        torch.manual_seed(5)
        with frozen_parameters(model):
            runs.append(attack.adversarial_perturbation(embed, pixels, target, attack_settings(norm)))
    assert torch.equal(runs[0], runs[1])


def test_precomputed_reference_embeddings_train_the_same(tmp_path, tiny_clip_path, photos_dataset):
    trainers = []
    for precompute in (False, True):
        args = make_args(tmp_path / str(precompute), max_steps=2, precompute_ref_embeddings=precompute)
        trainer = AFTTrainer(tiny_clip_path, args=args, train_dataset=photos_dataset)
        trainer.train()
        trainers.append(trainer)
    plain, cached = trainers
    assert [log["loss"] for log in cached.state.log_history[:2]] == pytest.approx(
        [log["loss"] for log in plain.state.log_history[:2]], rel=1e-5
    )
    assert_same_weights(vision_state(plain), vision_state(cached), atol=1e-6)
    # The batches carry e0 of their own images: the reference encoder's embeddings.
    batch = next(iter(cached.get_train_dataloader()))
    expected = cached.reference_embeds(cached.model, batch["pixel_values"])
    torch.testing.assert_close(batch["ref_embeds"], expected, atol=1e-6, rtol=1e-5)


def test_precompute_refuses_streaming_datasets_and_custom_collators(tmp_path, tiny_clip_path, photos_dataset):
    args = make_args(tmp_path, precompute_ref_embeddings=True)
    with pytest.raises(ValueError, match="precompute_ref_embeddings=True needs a map-style train_dataset"):
        AFTTrainer(tiny_clip_path, args=args, train_dataset=photos_dataset.to_iterable_dataset())
    with pytest.raises(ValueError, match="only valid with the default AFTDataCollator"):
        AFTTrainer(tiny_clip_path, args=args, train_dataset=photos_dataset, data_collator=lambda examples: {})


def test_precompute_drops_unreadable_images_and_counts_them(tmp_path, tiny_clip_path, photos_dataset):
    folder = tmp_path / "images" / "junk"
    folder.mkdir(parents=True)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    for i, image in enumerate(photos_dataset["image"][:4]):
        image.convert("RGB").save(folder / f"ok{i}.jpg")
    dataset = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "images"), split="train")
    args = make_args(tmp_path, max_steps=1, precompute_ref_embeddings=True)
    trainer = AFTTrainer(tiny_clip_path, args=args, train_dataset=dataset)
    trainer.train()
    assert len(trainer.train_dataset) == 4
    assert trainer.state.log_history[0]["skipped_images"] == 1


def test_activation_checkpointing_trains_the_same_with_a_frozen_attack(tmp_path, tiny_clip_path, photos_dataset):
    trainers = []
    for checkpointing in (False, True):
        args = make_args(tmp_path / str(checkpointing), activation_checkpointing=checkpointing)
        trainer = AFTTrainer(tiny_clip_path, args=args, train_dataset=photos_dataset)
        trainer.train()
        trainers.append(trainer)
    assert trainers[1].model.is_activation_checkpointing
    assert trainers[1].state.log_history[0]["loss"] == pytest.approx(trainers[0].state.log_history[0]["loss"], rel=1e-5)
    assert_same_weights(vision_state(trainers[0]), vision_state(trainers[1]), atol=1e-6)


def test_reference_forward_runs_under_the_run_autocast(tmp_path, tiny_clip_path, photos_dataset):
    # Without an attack the adversarial image is the clean one: the loss at initialisation is exactly 0 only if
    # the reference and the trained encoder run with the same precision.
    args = make_args(tmp_path, bf16=True, attack_eps=0.0, allow_no_op=True, max_steps=1)
    trainer = AFTTrainer(tiny_clip_path, args=args, train_dataset=photos_dataset)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == 0.0
