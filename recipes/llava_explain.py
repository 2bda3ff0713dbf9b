"""Where LLaVA's answer looks, original vs AFT tower: ``python recipes/llava_explain.py <config.yaml> [--flags]``.

The same as ``hf-clip-aft llava_explain ...``; the command lives in ``hf_clip_aft/commands/llava_explain.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("llava_explain")
