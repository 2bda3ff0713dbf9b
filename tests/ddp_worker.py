"""Worker of the 2-process DDP test: `torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR`.

Trains the tiny CLIP on the demo photos and saves, per rank, the final vision weights and the pixel sum of the
first batch it saw (different on the two ranks if the data really was sharded).
"""

import sys
from pathlib import Path

import datasets
import torch
import torch.distributed as dist

from hf_clip_aft import AFTConfig, AFTTrainer

ASSETS = Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets"


def main(out: str) -> None:
    args = AFTConfig(
        output_dir=out,
        use_cpu=True,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        attack_steps=2,
        ddp_find_unused_parameters=False,
        seed=0,
    )
    dataset = datasets.load_dataset("imagefolder", data_dir=str(ASSETS / "photos"), split="train")
    trainer = AFTTrainer(str(ASSETS / "tiny-clip"), args=args, train_dataset=dataset)
    first_batch = next(iter(trainer.get_train_dataloader()))["pixel_values"].sum().item()
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    rank = dist.get_rank()
    torch.save(
        {
            "world_size": dist.get_world_size(),
            "first_batch": first_batch,
            "state": model.state_dict(),
            "log": trainer.state.log_history,
        },
        Path(out) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
