"""Publish an AFT checkpoint on the Hub: ``python recipes/push.py --checkpoint out/ --repo_id org/name --dry_run``.

The same as ``hf-clip-aft push ...``; the command lives in ``hf_clip_aft/commands/push.py``.
"""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("push")
