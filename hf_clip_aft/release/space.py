"""A Hugging Face Space for released models: the comparison page (:mod:`hf_clip_aft.app`) as a Gradio Space.

The Space folder holds three files: ``app.py`` (starts the page with the models, by Hub id), ``requirements.txt``
(this package with its ``app`` extra, pinned to the version that wrote the folder) and ``README.md`` (the Space's
metadata: Gradio SDK and version, the models it links, license, tags; then what the page shows). It is written
atomically (a temporary folder renamed into place) and uploaded whole in one commit.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi, SpaceCard, SpaceCardData

from .card import TAGS
from .hub import check_repo_id, format_listing, upload_listing
from .names import on_hub

logger = logging.getLogger(__name__)

APP_FILE = "app.py"
REQUIREMENTS_FILE = "requirements.txt"
README_FILE = "README.md"
SPACE_FILES = (APP_FILE, REQUIREMENTS_FILE, README_FILE)

APP_TEMPLATE = '''"""The comparison page of hf_clip_aft: {names} side by side on any image."""

from hf_clip_aft.app import serve

serve({models!r})
'''

README_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

Drop in an image, type the classes to tell apart, and compare {% for m in models %}[{{ m }}](https://huggingface.co/{{ m }}){% if not loop.last %} and {% endif %}{% endfor %} side by side: each model's zero-shot probabilities over your classes, and its saliency maps by every map method of the `hf_clip_aft` evaluation suite (pixel gradients, Grad-CAM, attention, CLIP Surgery and the other training-free maps), drawn over the image on one colour scale per method.

AFT is adversarial fine-tuning of the CLIP image encoder for visual interpretability: Gong et al., *Boosting the Visual Interpretability of CLIP via Adversarial Fine-tuning*, ICLR 2025.

Run the same page on your machine:

```bash
pip install "{{ requirement }}"
hf-clip-aft app --models {{ models | join(" ") }}
```
"""  # noqa: E501 - one paragraph per line, as Markdown wants it


def default_requirement() -> str:
    """``hf_clip_aft[app]==<this version>``: the Space installs the release that wrote it."""
    return f"hf_clip_aft[app]=={version('hf_clip_aft')}"


def _gradio_version() -> str:
    try:
        return version("gradio")
    except PackageNotFoundError:
        raise ImportError(
            'Writing a Space pins the Gradio SDK to the installed Gradio: pip install "hf_clip_aft[app]".'
        ) from None


def space_models(candidates: Sequence[str | None]) -> list[str]:
    """The Hub ids among `candidates`, in order, each once; local paths are dropped (a Space cannot load them)."""
    models = []
    for name in candidates:
        if not name:
            continue
        if not on_hub(name):
            logger.warning("The Space leaves out %s: a Space loads models from the Hub; push it and give its id.", name)
        elif name not in models:
            models.append(name)
    return models


def space_card(space_id: str, models: Sequence[str], *, requirement: str, license: str | None = None) -> SpaceCard:
    """The Space's README.md: Gradio SDK metadata linking `models` (their ``models:`` entry), and what it shows."""
    title = space_id.split("/")[-1]
    card_data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=_gradio_version(),
        app_file=APP_FILE,
        models=list(models),
        license=license,
        tags=[*TAGS, "saliency"],
        emoji="🔍",
        colorFrom="red",
        colorTo="yellow",
        pinned=False,
        short_description="CLIP saliency maps side by side: base vs adversarially fine-tuned",
    )
    return SpaceCard.from_template(
        card_data, template_str=README_TEMPLATE, title=title, models=list(models), requirement=requirement
    )


def write_space(
    folder: str | Path,
    space_id: str,
    models: Sequence[str],
    *,
    requirement: str | None = None,
    license: str | None = None,
) -> Path:
    """Write the Space folder comparing `models` (Hub ids, base first) atomically; returns it.

    Args:
        folder: where to write it; an existing folder is replaced only if it holds nothing but Space files.
        space_id: the Space's repository, ``namespace/name``.
        models: the models the page compares, by Hub id (a Space cannot load local folders).
        requirement: the pip requirement that installs this package (default :func:`default_requirement`; e.g. a
            ``hf_clip_aft[app] @ git+https://...`` URL where the package is not on PyPI).
        license: the Space's license (e.g. the models').
    """
    folder = Path(folder)
    if not models:
        raise ValueError("A Space needs at least one model, by Hub id (e.g. openai/clip-vit-base-patch16).")
    local = [m for m in models if not on_hub(m)]
    if local:
        raise ValueError(f"{local} are local paths; a Space loads models from the Hub: push them and give their ids.")
    check_repo_id(space_id, "space_id", namespace=True)
    if folder.exists() and not set(os.listdir(folder)) <= set(SPACE_FILES):
        raise ValueError(f"{folder} exists and holds other files than a Space's {SPACE_FILES}; choose another folder.")
    requirement = requirement or default_requirement()
    card = space_card(space_id, models, requirement=requirement, license=license)
    app_source = APP_TEMPLATE.format(names=" and ".join(models), models=list(models))
    compile(app_source, APP_FILE, "exec")  # a syntax error must not reach the Space
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        (staging / APP_FILE).write_text(app_source)
        (staging / REQUIREMENTS_FILE).write_text(requirement + "\n")
        card.save(staging / README_FILE)
        check_space(staging)
        # The old folder is moved aside, not deleted, until the new one is in place.
        previous = staging.with_name(staging.name + "-previous")
        if folder.exists():
            folder.rename(previous)
        staging.rename(folder)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_space(folder: str | Path) -> SpaceCard:
    """The Space folder's card, parsed back as the Hub will; ValueError if a file is missing or the metadata is off."""
    folder = Path(folder)
    missing = [name for name in SPACE_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {missing}: write it with write_space first.")
    card = SpaceCard.load(folder / README_FILE, ignore_metadata_errors=False)
    if card.data.sdk != "gradio" or card.data.app_file != APP_FILE or not card.data.models:
        raise ValueError(f"{folder / README_FILE}: the metadata must name the gradio SDK, {APP_FILE} and the models.")
    return card


def push_space(
    folder: str | Path,
    space_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload the hf_clip_aft comparison page",
    dry_run: bool = False,
) -> CommitInfo | None:
    """Check the Space folder, then upload it whole to the Space `space_id` (created, Gradio SDK, if missing).

    Returns the commit, or None on a dry run (which checks the folder and uploads nothing). The token comes from
    ``hf auth login`` or ``HF_TOKEN`` unless given, and is never written anywhere.
    """
    check_repo_id(space_id, "space_id", namespace=True)
    check_space(folder)
    action = "Would upload" if dry_run else "Uploading"
    logger.info("%s %s to the Space %s:\n%s", action, folder, space_id, format_listing(upload_listing(folder)))
    if dry_run:
        return None
    api = HfApi(token=token)
    full_id = api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=full_id, repo_type="space", folder_path=folder, commit_message=commit_message)
