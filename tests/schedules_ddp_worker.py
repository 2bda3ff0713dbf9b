"""Worker of the 2-process schedule test: `torchrun --nproc_per_node 2 tests/schedules_ddp_worker.py OUT_DIR`.

Trains the tiny CLIP on the demo photos twice, with ``carry`` (two epochs, a checkpoint mid-way) and with ``free``,
and saves per rank what each schedule's per-example table held: for ``carry`` its entries at the end, for ``free``
how many of the batch's examples found their δ at each step (replays after the first must find them all on the
process that trained them).
"""

import sys
from pathlib import Path

import datasets
import torch
import torch.distributed as dist

from hf_clip_aft import AFTConfig, AFTTrainer

ASSETS = Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets"


def args(out: str, **overrides) -> AFTConfig:
    return AFTConfig(
        output_dir=out,
        use_cpu=True,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        report_to="none",
        attack_steps=1,
        ddp_find_unused_parameters=False,
        seed=0,
        disable_tqdm=True,
        **overrides,
    )


def main(out: str) -> None:
    dataset = datasets.load_dataset("imagefolder", data_dir=str(ASSETS / "photos"), split="train")
    carry = AFTTrainer(
        str(ASSETS / "tiny-clip"),
        args=args(f"{out}/carry", attack_schedule="carry", max_steps=4, save_strategy="steps", save_steps=3),
        train_dataset=dataset,
    )
    carry.train()
    free = AFTTrainer(
        str(ASSETS / "tiny-clip"),
        args=args(f"{out}/free", attack_schedule="free", attack_replays=3, max_steps=6, save_strategy="no"),
        train_dataset=dataset,
    )
    found = []
    perturb = free.attack_schedule.perturb

    def spy(embed, pixels, target, randomness, training):
        indices = [int(i) for i in randomness.indices]
        found.append(sum(i in free.attack_schedule.table.rows for i in indices))
        return perturb(embed, pixels, target, randomness, training)

    free.attack_schedule.perturb = spy
    free.train()
    rows = carry.attack_schedule.table.rows
    torch.save(
        {
            "carry": {index: (epoch, delta) for index, (epoch, _, delta) in rows.items()},
            "free_found": found,
        },
        Path(out) / f"rank{dist.get_rank()}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
