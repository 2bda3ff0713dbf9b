"""Attack schedules (hf_clip_aft/schedules.py): each against a hand-written reference of its paper's step, their
state across epochs, processes and resumes, their counted cost, and their start-up checks."""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from safetensors.torch import load_file
from torch.utils.data import BatchSampler

import test_attack  # tests/ is on the path, as for test_ddp's `conftest` import
from hf_clip_aft import AFTConfig, AFTTrainer, adversarial_perturbation
from hf_clip_aft.attack import ExampleRandomness, projected_gradient_ascent
from hf_clip_aft.modeling import frozen_parameters
from hf_clip_aft.schedules import (
    STATE_FILE,
    AttackSchedule,
    PerturbationTable,
    ReplaySampler,
    check_schedule_setup,
    reset_epoch,
    step_cost,
)
from test_trainer import make_args

# The tiny tower, four images with pixels at the range's edges, and their e0: test_attack's fixture.
setup = test_attack.setup
EPS = 4 / 255


def settings(**overrides):
    base = dict(
        attack_eps=4.0,
        attack_step_size=1.0,
        attack_steps=3,
        attack_eta=1.0,
        noise_sigma=1.0,
        attack_norm="huber",
        attack_schedule="pgd",
        attack_early_stop=False,
        attack_fgsm_step=None,
        attack_replays=3,
        attack_carry_reset_epochs=10,
    )
    return SimpleNamespace(**{**base, **overrides})


def reference_pgd(embed, x, e0, steps, alpha, eps=EPS, eta=1 / 255, sigma=1.0):
    """The paper's PGD (DEVELOPERS.md), written out: clamped uniform start, smoothing noise, huber penalty, sign
    steps, box then image-range projection. The same operations in the same order as the library's."""
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = (x + delta.clamp(-eps, eps)).clamp(0, 1) - x
    for _ in range(steps):
        smoothed = (x + torch.empty_like(x).normal_() * sigma / 255).clamp(0, 1)
        delta.requires_grad_(True)
        with torch.enable_grad():
            distance = (embed(smoothed + delta) - e0).pow(2).sum(dim=-1).mean()
            objective = distance - (eta / eps) * torch.linalg.vector_norm(delta, dim=1).mean()
            (grad,) = torch.autograd.grad(objective * 2.0**16, delta)
        with torch.no_grad():
            delta = (x + (delta + alpha * grad.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    return (x + delta).detach()


def test_default_pgd_is_bit_identical_to_the_reference_and_to_the_schedule(setup):
    model, embed, pixels, target = setup
    default = AFTConfig(output_dir="unused", attack_steps=3)
    assert default.attack_schedule == "pgd" and not default.attack_early_stop
    with frozen_parameters(model):
        torch.manual_seed(11)
        reference = reference_pgd(embed, pixels, target, 3, 1 / 255)
        torch.manual_seed(11)
        library = adversarial_perturbation(embed, pixels, target, default)
        torch.manual_seed(11)
        scheduled = AttackSchedule(default).perturb(embed, pixels, target, None, training=True)
    assert (library - pixels).abs().max() > 0
    assert torch.equal(library, reference)
    assert torch.equal(scheduled.pixels, library)
    assert scheduled.steps.tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize("norm, sigma", [("linf", 0.0), ("huber", 1.0)])
def test_fgsm_rs_equals_a_hand_written_fgsm_rs_step(setup, norm, sigma):
    """Wong et al. (train_fgsm.py:105-118): δ ~ U(−ε, ε) clamped to the image range, one step of 1.25 ε along the
    gradient's sign, clamp to [−ε, ε], clamp to the image range; here on the library's objective."""
    model, embed, pixels, target = setup
    eta = 1 / 255
    torch.manual_seed(5)
    delta = torch.empty_like(pixels).uniform_(-EPS, EPS)
    delta = (pixels + delta.clamp(-EPS, EPS)).clamp(0, 1) - pixels
    smoothed = (pixels + torch.empty_like(pixels).normal_() * sigma / 255).clamp(0, 1) if sigma else pixels
    delta.requires_grad_(True)
    objective = (embed(smoothed + delta) - target).pow(2).sum(dim=-1).mean()
    if norm == "huber":
        objective = objective - (eta / EPS) * torch.linalg.vector_norm(delta, dim=1).mean()
    (grad,) = torch.autograd.grad(objective * 2.0**16, delta)
    with torch.no_grad():
        expected = (pixels + (delta + 1.25 * EPS * grad.sign()).clamp(-EPS, EPS)).clamp(0, 1)

    schedule = AttackSchedule(settings(attack_schedule="fgsm_rs", attack_norm=norm, noise_sigma=sigma))
    torch.manual_seed(5)
    with frozen_parameters(model):
        outcome = schedule.perturb(embed, pixels, target, None, training=True)
    assert torch.equal(outcome.pixels, expected)
    assert outcome.steps.tolist() == [1] * 4
    # Evaluation attacks with plain PGD whatever the schedule.
    torch.manual_seed(5)
    with frozen_parameters(model):
        evaluation = schedule.perturb(embed, pixels, target, None, training=False)
    assert evaluation.steps.tolist() == [3] * 4


def test_early_stop_keeps_the_best_delta_and_skips_stopped_rows():
    """A planted objective sin²(k · mean(x + δ)) peaks at k · m = π/2: the row started just below the peak overshoots
    at its first step (its objective falls) and stops there; the row far below keeps rising for all K steps."""
    k, alpha = 40.0, 1 / 255
    pixels = torch.empty(2, 3, 8, 8)
    pixels[0] = math.pi / 2 / k - 0.25 * alpha  # one step of α overshoots the peak by 3α/4 (the start is 0)
    pixels[1] = (math.pi / 2 - 1.0) / k  # five steps of α stay below the peak
    batch_sizes = []

    def embed(x):
        batch_sizes.append(len(x))
        return torch.sin(k * x.mean(dim=(1, 2, 3)))[:, None]

    cfg = settings(attack_norm="linf", noise_sigma=0.0, attack_steps=5, attack_eps=8.0)
    start = torch.zeros_like(pixels)
    carried = torch.ones(2, dtype=torch.bool)  # start both rows at δ = 0, to know where the peak is
    outcome = projected_gradient_ascent(
        embed, pixels, torch.zeros(2, 1), cfg, start=start, carried=carried, early_stop=True
    )
    # Row 0: step 1 evaluates δ = 0 and steps to +α; step 2 finds a lower objective, stops, goes back to δ = 0.
    assert outcome.steps.tolist() == [2, 5]
    assert torch.equal(outcome.pixels[0], pixels[0])
    assert batch_sizes == [2, 2, 1, 1, 1]  # the stopped row is not forwarded again
    full = projected_gradient_ascent(embed, pixels, torch.zeros(2, 1), cfg, start=start, carried=carried)
    assert torch.allclose(outcome.pixels[1], full.pixels[1])  # a row that never stops takes PGD's steps
    assert full.steps.tolist() == [5, 5]


def test_carry_starts_from_the_last_delta_and_resets_like_atta(setup):
    model, embed, pixels, target = setup
    inputs = []

    def record(x):
        inputs.append(x.detach().clone())
        return embed(x)

    schedule = AttackSchedule(settings(attack_schedule="carry", attack_steps=1, noise_sigma=0.0))
    indices = [3, 0, 5, 1]
    with frozen_parameters(model):
        first = schedule.perturb(record, pixels, target, ExampleRandomness(0, 0, indices), training=True)
        assert len(schedule.table) == 4
        second = schedule.perturb(record, pixels, target, ExampleRandomness(0, 1, indices), training=True)
        # Epoch 9 is ATTA's first reset (1-based epoch 10): random starts again, from epoch 9's own draw.
        reset = schedule.perturb(record, pixels, target, ExampleRandomness(0, 9, indices), training=True)
        fresh = projected_gradient_ascent(record, pixels, target, schedule.config, ExampleRandomness(0, 9, indices))
    # δ is stored in float16: the second attack starts from the first's δ to float16 precision.
    torch.testing.assert_close(inputs[1], first.pixels, rtol=0, atol=EPS * 2**-10)
    assert not torch.equal(inputs[1], inputs[0])
    assert torch.equal(inputs[2], inputs[3])  # after the reset: the same start as a fresh attack
    assert torch.equal(reset.pixels, fresh.pixels)
    assert not torch.allclose(second.pixels, first.pixels)
    assert [reset_epoch(e, 10) for e in (0, 8, 9, 10, 18, 19, 25)] == [0, 0, 9, 9, 9, 19, 19]
    assert reset_epoch(25, None) == 0


def test_free_takes_the_next_delta_from_the_training_backward(setup):
    """Shafahi et al. (main_free.py:179-200): each replay's one backward gives the weight gradient and
    δ ← clip(δ + step · sign(∂L/∂x)); the next replay of the batch starts there; after m replays it is dropped."""
    model, embed, pixels, target = setup
    schedule = AttackSchedule(settings(attack_schedule="free", attack_replays=2))
    randomness = ExampleRandomness(0, 0, [7, 2, 4, 1])
    outcome = schedule.perturb(embed, pixels, target, randomness, training=True)
    assert outcome.pixels.requires_grad and outcome.steps.tolist() == [0] * 4  # no attack forward at all
    model.zero_grad()
    loss = (embed(outcome.pixels) - target).pow(2).sum(dim=-1).mean()
    loss.backward()  # the training backward: weight gradients and, through the hook, the next δ
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    delta = outcome.pixels.detach() - pixels
    step = outcome.pixels.grad.sign() * EPS  # attack_fgsm_step None: ε for free
    expected = (pixels + (delta + step).clamp(-EPS, EPS)).clamp(0, 1)
    replay = schedule.perturb(embed, pixels, target, randomness, training=True)
    torch.testing.assert_close(replay.pixels.detach(), expected, rtol=0, atol=EPS * 2**-10)
    (embed(replay.pixels) - target).pow(2).sum().backward()
    assert len(schedule.table) == 0  # the second of m = 2 replays: nothing left to carry


def test_replay_sampler_keeps_each_example_on_its_process_and_replays_it_m_times():
    sampler = ReplaySampler(size=24, group=8, replays=3, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 72
    groups = [order[i : i + 8] for i in range(0, 72, 8)]
    assert groups[0] == groups[1] == groups[2] != groups[3]
    assert sorted(sum(groups[::3], [])) == list(range(24))  # every example once per replay round
    sampler.set_epoch(1)
    assert list(sampler) != order
    sampler.set_epoch(0)
    assert list(sampler) == order  # seeded by epoch: a resume replays the same order
    # accelerate's sharding (2 processes, batch 2, so 2 accumulation steps per group of 8): in every replay each
    # process gets the same examples as in the previous one.
    for rank in (0, 1):
        shard = BatchSamplerShard(BatchSampler(sampler, 2, False), num_processes=2, process_index=rank)
        batches = list(shard)
        per_replay = [sorted(sum(batches[i : i + 2], [])) for i in range(0, len(batches), 2)]
        assert per_replay[0] == per_replay[1] == per_replay[2]
    assert list(ReplaySampler(4, 2, 2, 0, shuffle=False)) == [0, 1, 0, 1, 2, 3, 2, 3]


def test_table_round_trips_and_merges_the_newest(tmp_path):
    table = PerturbationTable()
    table.store([4, 9], torch.rand(2, 3, 4, 4), epoch=1)
    other = PerturbationTable()
    other.store([9, 2], torch.rand(2, 3, 4, 4), epoch=2)
    table.merge(other.rows)
    assert sorted(table.rows) == [2, 4, 9] and table.rows[9][0] == 2
    schedule = AttackSchedule(settings(attack_schedule="carry"))
    schedule.table = table
    schedule.save(tmp_path, write=True)
    restored = AttackSchedule(settings(attack_schedule="carry"))
    restored.load(tmp_path)
    assert restored.table.rows.keys() == table.rows.keys()
    for index, (epoch, uses, delta) in table.rows.items():
        assert restored.table.rows[index][:2] == (epoch, uses)
        assert torch.equal(restored.table.rows[index][2], delta)


def test_start_up_line_says_what_the_schedule_costs():
    assert AttackSchedule(settings()).describe(1000, 224) is None  # plain PGD: nothing to say
    carry = AttackSchedule(settings(attack_schedule="carry", attack_steps=1)).describe(1000, 224)
    assert "up to 0.28 GiB of δ" in carry  # 1000 × 3 × 224² float16
    assert "replayed 3 times" in AttackSchedule(settings(attack_schedule="free")).describe(1000, 224)


def test_step_cost_counts_forward_equivalents():
    assert step_cost(torch.tensor([10, 10]), reference=True, clean_forward=False) == 24.0  # 2K + 4
    assert step_cost(torch.tensor([4, 2]), reference=False, clean_forward=False) == 9.0  # early stop: 2·3 + 3
    assert step_cost(torch.tensor([0, 0]), reference=True, clean_forward=True) == 7.0  # free with a clean loss


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("attack_schedule", "fast", "attack_schedule='fast' is invalid"),
        ("attack_replays", 0, "attack_replays=0 is invalid"),
        ("attack_fgsm_step", 0.0, "attack_fgsm_step=0.0 is invalid"),
        ("attack_carry_reset_epochs", 0, "attack_carry_reset_epochs=0 is invalid"),
    ],
)
def test_bad_schedule_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        AFTConfig(output_dir="unused", **{field: value})


@pytest.mark.parametrize("schedule", ["fgsm_rs", "free"])
def test_early_stop_needs_a_multi_step_schedule(schedule):
    with pytest.raises(ValueError, match="attack_early_stop=True is invalid.*'fgsm_rs' or 'free'"):
        AFTConfig(output_dir="unused", attack_schedule=schedule, attack_early_stop=True)


def test_stateful_schedules_refuse_streaming_data_and_other_samplers(photos_dataset):
    streaming = photos_dataset.to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style train_dataset, not a streaming one"):
        check_schedule_setup(settings(attack_schedule="carry"), streaming, custom_collator=False)
    grouped = settings(attack_schedule="free", train_sampling_strategy="group_by_length")
    with pytest.raises(ValueError, match="train_sampling_strategy='group_by_length' is not supported"):
        check_schedule_setup(grouped, photos_dataset, custom_collator=False)
    check_schedule_setup(settings(attack_schedule="fgsm_rs"), streaming, custom_collator=True)  # stateless: fine


@pytest.mark.parametrize(
    "overrides, cost",
    [
        ({}, 8.0),  # reference 1 + attack 2·2 + training 3
        ({"attack_schedule": "fgsm_rs"}, 6.0),
        ({"attack_schedule": "free", "attack_replays": 2}, 4.0),
    ],
)
def test_trainer_logs_the_forward_equivalents_it_spent(tmp_path, tiny_clip_path, photos_dataset, overrides, cost):
    trainer = AFTTrainer(
        tiny_clip_path, args=make_args(tmp_path, max_steps=2, **overrides), train_dataset=photos_dataset
    )
    trainer.train()
    logged = [log["forward_equivalents"] for log in trainer.state.log_history if "forward_equivalents" in log]
    assert logged == [cost, cost]


@pytest.mark.parametrize("batch, accumulation", [(4, 1), (2, 2)])
def test_trainer_free_replays_each_batch_m_times(tmp_path, tiny_clip_path, photos_dataset, batch, accumulation):
    """m = 3 replays of each optimiser step's examples, one optimiser step (and one backward per micro-batch) per
    replay; with gradient accumulation the whole accumulated step is replayed, micro-batch by micro-batch."""
    args = make_args(
        tmp_path,
        max_steps=6,
        attack_schedule="free",
        attack_replays=3,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
    )
    trainer = AFTTrainer(tiny_clip_path, args=args, train_dataset=photos_dataset)
    seen = []
    perturb = trainer.attack_schedule.perturb

    def spy(embed, pixels, target, randomness, training):
        outcome = perturb(embed, pixels, target, randomness, training)
        seen.append((sorted(randomness.indices.tolist()), len(trainer.attack_schedule.table)))
        return outcome

    trainer.attack_schedule.perturb = spy
    trainer.train()
    steps = [
        sum((indices for indices, _ in seen[i : i + accumulation]), [])
        for i in range(0, 6 * accumulation, accumulation)
    ]
    assert [len(step) for step in steps] == [4] * 6
    assert steps[0] == steps[1] == steps[2] != steps[3] == steps[4] == steps[5]
    # At each step's first micro-batch: the step's δ from the previous replay's backwards before replays 2 and 3
    # (all 4 examples), nothing before replay 1 (the m-th replay's backward dropped them).
    assert [table for _, table in seen[::accumulation]] == [0, 4, 4, 0, 4, 4]
    assert trainer.state.global_step == 6  # one optimiser step per replay


def test_trainer_resume_restores_the_carry_table(tmp_path, tiny_clip_path, photos_dataset, caplog):
    """8 images, batch 4: two steps per epoch. A run of 3 epochs against one stopped at step 3 (mid-epoch 2) and
    resumed: the resumed run must end with the same table (and weights) as the uninterrupted one."""
    kwargs = dict(max_steps=6, attack_schedule="carry", attack_steps=1, save_strategy="steps", save_steps=3)

    def run(folder, resume=None):
        trainer = AFTTrainer(tiny_clip_path, args=make_args(folder, **kwargs), train_dataset=photos_dataset)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    cut = tmp_path / "cut"
    run(cut)
    checkpoints = cut / "out"  # test_trainer.make_args writes into <folder>/out
    assert (checkpoints / "checkpoint-3" / STATE_FILE).is_file()
    shutil.rmtree(checkpoints / "checkpoint-6")
    resumed = run(cut, resume=str(checkpoints / "checkpoint-3"))
    assert full.attack_schedule.table.rows.keys() == resumed.attack_schedule.table.rows.keys() == set(range(8))
    for index, (epoch, _, delta) in full.attack_schedule.table.rows.items():
        assert resumed.attack_schedule.table.rows[index][0] == epoch
        assert torch.equal(resumed.attack_schedule.table.rows[index][2], delta), index
    # Without the table the resumed run starts those examples afresh and ends elsewhere (the check above can fail).
    (checkpoints / "checkpoint-3" / STATE_FILE).unlink()
    shutil.rmtree(checkpoints / "checkpoint-6")
    lost = run(cut, resume=str(checkpoints / "checkpoint-3"))
    assert "has no attack_perturbations.safetensors" in caplog.text
    assert any(
        not torch.equal(lost.attack_schedule.table.rows[i][2], delta)
        for i, (_, _, delta) in full.attack_schedule.table.rows.items()
    )


def test_attack_runs_in_eval_mode_and_restores_the_mode(tmp_path, tiny_clip_path, photos_dataset):
    """A LoRA with dropout 0.5: in train mode its attack would draw new dropout masks at every call; in eval mode
    (the official code's) the same batch gives the same δ twice, and the model is back in train mode after."""
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"])
    trainer = AFTTrainer(
        tiny_clip_path, args=make_args(tmp_path, max_steps=1), train_dataset=photos_dataset, peft_config=lora
    )
    with torch.no_grad():  # LoRA's B starts at 0, where dropout has nothing to drop: give the adapters weight
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    modes, outcomes = [], []
    perturb = trainer.attack_schedule.perturb

    def spy(embed, pixels, target, randomness, training):
        modes.append((trainer.model.training, training))
        outcomes.append(perturb(embed, pixels, target, randomness, training).pixels)
        return outcomes[-1]

    trainer.attack_schedule.perturb = lambda *a, **k: SimpleNamespace(pixels=spy(*a, **k), steps=torch.zeros(4))
    trainer.model.train()
    for _ in range(2):
        trainer.compute_loss(trainer.model, batch)
    assert trainer.model.training
    assert modes == [(False, True), (False, True)]  # eval mode inside the attack, a training step's schedule
    assert torch.equal(outcomes[0], outcomes[1])
    # The same attack in train mode differs between calls: dropout is live, so the check above can fail.
    randomness = trainer.attack_randomness(trainer.model, batch)
    target = trainer.reference_embeds(trainer.model, batch["pixel_values"])
    with frozen_parameters(trainer.model):
        live = [
            perturb(lambda x: trainer._embed(trainer.model, x), batch["pixel_values"], target, randomness, True).pixels
            for _ in range(2)
        ]
    assert not torch.equal(live[0], live[1])


def test_two_process_ddp_shares_the_carry_table_and_keeps_free_replays_local(tmp_path):
    """Two real gloo DDP processes: ``carry``'s table is merged over the ranks (each rank saw half the examples) and
    saved mid-run (a collective); ``free`` finds every example's δ on its own rank at replays 2 and 3."""
    worker = Path(__file__).with_name("schedules_ddp_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    result = subprocess.run([*cmd, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert sorted(ranks[0]["carry"]) == sorted(ranks[1]["carry"]) == list(range(8))
    for index, (epoch, delta) in ranks[0]["carry"].items():
        assert ranks[1]["carry"][index][0] == epoch
        assert torch.equal(ranks[1]["carry"][index][1], delta)
    saved = load_file(tmp_path / "carry" / "checkpoint-3" / STATE_FILE)
    assert sorted(saved["indices"].tolist()) == list(range(8))  # epoch 0's 8 from both ranks, then epoch 1's
    for rank in ranks:  # 2 images per rank and step: none found at a group's first replay, both at the others
        assert rank["free_found"] == [0, 2, 2, 0, 2, 2]


@pytest.mark.parametrize(
    "overrides, sentence, row",
    [
        ({}, "a 10-step signed-gradient PGD from a random start", None),
        ({"attack_schedule": "fgsm_rs"}, "one signed-gradient step from a random start", "| fgsm_rs |"),
        ({"attack_schedule": "free"}, "every batch is replayed 4 times", "| free, m = 4 replays |"),
        (
            {"attack_schedule": "carry", "attack_steps": 1},
            "1-step signed-gradient PGD from the perturbation",
            "| carry |",
        ),
        (
            {"attack_early_stop": True},
            "stopped for an image once its objective stops rising",
            "| pgd, early stopping |",
        ),
    ],
)
def test_record_and_card_name_the_schedule(tmp_path, overrides, sentence, row):
    from hf_clip_aft.release.card import render_card
    from hf_clip_aft.release.record import TrainingRecord

    record = TrainingRecord.from_config(AFTConfig(output_dir=str(tmp_path), **overrides), base_model="tiny-clip")
    assert record.hyperparameters["attack_schedule"] == overrides.get("attack_schedule", "pgd")
    text = str(render_card(record))
    assert sentence in text
    assert (row in text) if row else ("Attack schedule" not in text)


def test_official_preset_names_a_cheaper_schedule_as_a_difference():
    from hf_clip_aft.config import OFFICIAL_SETTINGS

    preset = dict(OFFICIAL_SETTINGS)
    assert AFTConfig(output_dir="unused", **preset).official_differences() == {}
    cheaper = AFTConfig(output_dir="unused", **preset, attack_schedule="fgsm_rs")
    assert cheaper.official_differences() == {"attack_schedule": "fgsm_rs"}
    stopped = AFTConfig(output_dir="unused", **preset, attack_early_stop=True)
    assert stopped.official_differences() == {"attack_early_stop": True}
