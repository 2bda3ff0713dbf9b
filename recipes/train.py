"""Adversarial fine-tuning of a CLIP image encoder: ``python recipes/train.py recipes/configs/demo.yaml``.

The same as ``hf-clip-aft train ...``; the command lives in ``hf_clip_aft/commands/train.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("train")
