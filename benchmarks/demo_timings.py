"""Wall time of the README's offline demos, each run exactly as the README or docs/*.md writes it, in a fresh clone.

    python benchmarks/demo_timings.py            # writes benchmarks/results/demo_timings.json (15-20 min, 2 cores)

Clones the repository's committed HEAD into a temporary folder and runs :data:`STEPS` there in the README's order
(the training demo first: the others read its ``outputs/demo``), with this interpreter's environment: its ``bin``
first on PATH and the clone first on PYTHONPATH, so the clone's code runs even where the environment holds an
editable install of another tree. Per step it records the wall seconds, the exit code, the load average before and
after, and the last lines of the output when the step fails. The file is written atomically; the script exits
non-zero when any step failed. ``tests/test_readme_numbers.py`` checks that every step's text is on a page verbatim,
and ``experiments/readme_numbers.py`` makes the pages quote the file's seconds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hf_clip_aft.files import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "benchmarks" / "results" / "demo_timings.json"
TAIL_CHARS = 4000


@dataclass(frozen=True)
class Step:
    """`text`, as a page writes it (a bash command, or with `language` "python" a snippet run by ``python -c``)."""

    name: str
    text: str
    language: str = "bash"


STEPS: tuple[Step, ...] = (
    Step("train", "python recipes/train.py recipes/configs/demo.yaml"),
    Step(
        "monitor",
        "python recipes/train.py recipes/configs/demo.yaml --output_dir outputs/demo-monitor --monitor_maps true \\\n"
        "    --monitor_split train --eval_strategy steps --eval_steps 10 --save_strategy steps --save_steps 10 \\\n"
        "    --metric_for_best_model deletion_auc --load_best_model_at_end true",
    ),
    Step(
        "evaluate",
        "python recipes/evaluate.py --models hf_clip_aft/assets/tiny-clip outputs/demo \\\n"
        "    --dataset hf_clip_aft/assets/photos --split train --limit 8 --grid_images 3 --output outputs/eval-demo/",
    ),
    Step("dissect", "python recipes/dissect.py recipes/configs/dissect.yaml"),
    Step(
        "llava_setup",
        """import torch
from transformers import (AutoTokenizer, CLIPImageProcessor, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)
from hf_clip_aft import swap_llava_vision_tower
from hf_clip_aft.model_configs import clip_config

clip = "hf_clip_aft/assets/tiny-clip"
tokenizer = AutoTokenizer.from_pretrained(clip)
tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
processor = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(clip), tokenizer=tokenizer,
                           patch_size=16, vision_feature_select_strategy="default", num_additional_image_tokens=1)
text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
config = LlavaConfig(vision_config=clip_config("tiny").vision_config, text_config=text,
                     image_token_index=processor.image_token_id, image_seq_length=16)
torch.manual_seed(0)
llava = swap_llava_vision_tower(LlavaForConditionalGeneration(config), clip)
llava.save_pretrained("outputs/tiny-llava")
processor.save_pretrained("outputs/tiny-llava")
""",
        "python",
    ),
    Step(
        "llava_explain",
        "python recipes/llava_explain.py --llava outputs/tiny-llava --vision outputs/demo "
        "--images hf_clip_aft/assets/photos \\\n"
        "    --limit 4 --max_new_tokens 4 --figure_tokens 4 --output outputs/llava-maps-demo",
    ),
)


def environment(clone: Path) -> dict[str, str]:
    """This process's environment with this interpreter's ``bin`` first on PATH and `clone` first on PYTHONPATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(clone), env.get("PYTHONPATH"))))
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix
    return env


def clone_head(repo: Path, into: Path) -> str:
    """Clone `repo`'s committed HEAD into `into` (uncommitted changes stay behind); its commit hash."""
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(repo), str(into)], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=into, check=True, capture_output=True, text=True)
    return head.stdout.strip()


def check_imports_clone(clone: Path, env: dict[str, str]) -> None:
    """Refuse to time another tree: `python` in the clone must import the clone's hf_clip_aft."""
    found = subprocess.run(
        ["python", "-c", "import hf_clip_aft; print(hf_clip_aft.__file__)"],
        cwd=clone,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(clone.resolve()):
        raise RuntimeError(f"python in {clone} imports hf_clip_aft from {found}, not the clone: check PYTHONPATH.")


def run_step(step: Step, clone: Path, env: dict[str, str]) -> dict:
    """Run `step` in `clone`: wall seconds, exit code, load average (1, 5, 15 min) before and after; on failure
    the last :data:`TAIL_CHARS` characters of its output (stdout and stderr together)."""
    command = ["bash", "-c", step.text] if step.language == "bash" else ["python", "-c", step.text]
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - start
    row = {
        "name": step.name,
        "language": step.language,
        "text": step.text,
        "wall_seconds": round(seconds, 1),
        "exit_code": done.returncode,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    if done.returncode:
        row["output_tail"] = done.stdout[-TAIL_CHARS:]
    return row


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help="The JSON file written (atomically).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="demo-timings-") as folder:
        clone = Path(folder) / "repo"
        commit = clone_head(REPO, clone)
        env = environment(clone)
        check_imports_clone(clone, env)
        started = utc_now()
        rows = []
        for step in STEPS:
            rows.append(run_step(step, clone, env))
            print(f"{step.name}: {rows[-1]['wall_seconds']} s, exit {rows[-1]['exit_code']}", flush=True)
    report = {
        "schema": "hf_clip_aft.demo_timings/v1",
        "commit": commit,
        "started": started,
        "finished": utc_now(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": sys.version.split()[0],
        "steps": rows,
    }
    write_json_atomic(args.output, report)
    failed = [row["name"] for row in rows if row["exit_code"]]
    if failed:
        sys.exit(f"Failed steps: {', '.join(failed)}; their exit codes and output tails are in {args.output}.")


if __name__ == "__main__":
    main()
