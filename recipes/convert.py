"""Import an open_clip robust CLIP image encoder: ``python recipes/convert.py recipes/configs/convert.yaml``.

The same as ``hf-clip-aft convert ...``; the command lives in ``hf_clip_aft/commands/convert.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("convert")
