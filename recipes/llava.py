"""Put an AFT CLIP vision tower into a LLaVA checkpoint: ``python recipes/llava.py recipes/configs/llava.yaml``.

The same as ``hf-clip-aft llava ...``; the command lives in ``hf_clip_aft/commands/llava.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("llava")
