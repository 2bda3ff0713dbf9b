"""Compare CLIP models' maps in a web page: ``python recipes/app.py --models BASE AFT``.

The same as ``hf-clip-aft app ...``; the command lives in ``hf_clip_aft/commands/app.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("app")
