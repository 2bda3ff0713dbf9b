"""Network dissection of CLIP image encoders: ``python recipes/dissect.py [config.yaml] [--flags]`` (see --help)."""

from hf_clip_aft.cli import run_command

if __name__ == "__main__":
    run_command("dissect")
