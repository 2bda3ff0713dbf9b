"""Write Pascal VOC 2012's single-object images as a dataset folder: ``python recipes/prepare_voc.py --output DIR``.

The same as ``hf-clip-aft prepare_voc ...``; the command lives in ``hf_clip_aft/commands/prepare_voc.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("prepare_voc")
