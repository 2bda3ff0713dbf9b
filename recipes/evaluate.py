"""Compare CLIP image encoders on interpretability and zero-shot metrics: ``python recipes/evaluate.py --help``.

The same as ``hf-clip-aft evaluate ...``; the command lives in ``hf_clip_aft/commands/evaluate.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("evaluate")
