"""Images -> pixels: modes, ranges, processor geometry, column detection, streaming."""

import datasets
import pytest
import torch
from PIL import Image

from conftest import PHOTOS
from hf_clip_aft.data import (
    INDEX_COLUMN,
    AFTDataCollator,
    find_image_column,
    images_to_pixels,
    load_image_dataset,
    prepare_dataset,
    with_example_index,
)


def test_every_pil_mode_becomes_rgb_pixels_in_unit_range(tiny_processor):
    images = [Image.new(mode, (80, 120), 1) for mode in ("1", "L", "P", "RGBA", "CMYK", "I;16")]
    pixels = images_to_pixels(images, tiny_processor.image_processor)
    assert pixels.shape == (6, 3, 64, 64) and pixels.dtype == torch.float32
    assert pixels.min() >= 0 and pixels.max() <= 1


def test_pixels_are_the_processor_output_without_normalisation(tiny_processor, photos_dataset):
    images = photos_dataset["image"][:2]
    ours = images_to_pixels(images, tiny_processor.image_processor)
    processed = tiny_processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    mean = torch.tensor(tiny_processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_processor.image_processor.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close((ours - mean) / std, processed["pixel_values"], atol=1e-5, rtol=1e-5)


def test_photos_include_greyscale_and_bilevel_files(photos_dataset):
    modes = {image.mode for image in photos_dataset["image"]}
    assert {"L", "1"} <= modes  # the demo exercises the RGB conversion


def test_image_column_is_found_by_type_or_refused_by_name():
    features = datasets.Features({"caption": datasets.Value("string"), "img": datasets.Image()})
    assert find_image_column(features) == "img"
    with pytest.raises(ValueError, match="image_column='picture'"):
        find_image_column(features, "picture")
    with pytest.raises(ValueError, match="No column of type Image"):
        find_image_column(datasets.Features({"caption": datasets.Value("string")}))


def test_collator_skips_what_it_cannot_decode(tiny_processor, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (70, 70), (255, 0, 0)).save(good)
    collate = AFTDataCollator(tiny_processor.image_processor, label_column="label")
    batch = collate(
        [
            {"image": {"path": str(good), "bytes": None}, "label": 3},
            {"image": {"path": None, "bytes": b"garbage"}, "label": 5},
        ]
    )
    assert batch["pixel_values"].shape == (1, 3, 64, 64)
    assert batch["num_skipped"].sum().item() == 1 and batch["labels"].tolist() == [3]
    # A batch where every image fails is not an error: one blank row flagged as a placeholder, with the count.
    empty = collate([{"image": {"path": None, "bytes": b"garbage"}, "label": 0}])
    assert empty["placeholder"].tolist() == [1.0] and empty["num_skipped"].tolist() == [1.0]


def test_local_folder_loads_with_class_names(tiny_processor):
    dataset = load_image_dataset(PHOTOS)
    assert dataset.num_rows == 8 and "cat" in dataset.features["label"].names


def test_streaming_dataset_trains(tmp_path, tiny_clip_path):
    from hf_clip_aft import AFTConfig, AFTTrainer

    streamed = load_image_dataset(PHOTOS, streaming=True)
    args = AFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        attack_steps=1,
    )
    trainer = AFTTrainer(tiny_clip_path, args=args, train_dataset=streamed)
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.state.log_history[0]["skipped_images"] == 0


def test_batches_carry_each_kept_example_index(tiny_processor, photos_dataset):
    dataset = with_example_index(prepare_dataset(photos_dataset, "image"))
    assert dataset[INDEX_COLUMN] == list(range(8)) and with_example_index(dataset) is dataset
    examples = [dataset[i] for i in (6, 2, 4)]
    examples[1] = {**examples[1], "image": {"path": None, "bytes": b"garbage"}}
    batch = AFTDataCollator(tiny_processor.image_processor)(examples)
    assert batch["example_index"].tolist() == [6, 4]  # the unreadable example's index is dropped with it
    streamed = with_example_index(prepare_dataset(photos_dataset.to_iterable_dataset(), "image"))
    assert INDEX_COLUMN in streamed.features
    assert [example[INDEX_COLUMN] for example in streamed] == list(range(8))
