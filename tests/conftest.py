"""Shared fixtures: the shipped tiny CLIP and demo photos, so every test runs offline in seconds."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub: everything they load ships in the repo

import datasets
import pytest
import torch
from transformers import CLIPModel, CLIPProcessor, CLIPVisionModelWithProjection

from hf_clip_aft.model_configs import clip_config

ASSETS = Path(__file__).resolve().parents[1] / "hf_clip_aft" / "assets"
TINY_CLIP = str(ASSETS / "tiny-clip")
PHOTOS = str(ASSETS / "photos")


@pytest.fixture(scope="session")
def tiny_clip_path() -> str:
    return TINY_CLIP


@pytest.fixture(scope="session")
def photos_dataset() -> datasets.Dataset:
    return datasets.load_dataset("imagefolder", data_dir=PHOTOS, split="train")


@pytest.fixture(scope="session")
def tiny_processor() -> CLIPProcessor:
    return CLIPProcessor.from_pretrained(TINY_CLIP)


@pytest.fixture
def tiny_clip() -> CLIPModel:
    return CLIPModel.from_pretrained(TINY_CLIP)


@pytest.fixture
def tiny_vision() -> CLIPVisionModelWithProjection:
    """A randomly initialised tiny vision tower with projection (seeded)."""
    torch.manual_seed(0)
    config = clip_config("tiny").vision_config
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="session")
def aft_stand_in(tmp_path_factory) -> str:
    """A saved copy of tiny-clip with perturbed vision weights (seeded), standing in for an AFT model."""
    path = tmp_path_factory.mktemp("models") / "tiny-clip-aft"
    torch.manual_seed(1)
    model = CLIPModel.from_pretrained(TINY_CLIP)
    with torch.no_grad():
        for parameter in model.vision_model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(path)
    CLIPProcessor.from_pretrained(TINY_CLIP).save_pretrained(path)
    return str(path)
