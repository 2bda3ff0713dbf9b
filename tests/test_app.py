"""The comparison page: its functions called directly, the real app on 127.0.0.1 through `gradio_client`, and the
page in headless Chromium (Debian's `chromium`, driven by Playwright; no browser download), plus the Space folder.

Network use is loopback only: the server listens on 127.0.0.1, Gradio's analytics are off, and the browser aborts
every request that does not go to the server.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no calls home

import contextlib
import io
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import BertConfig

from conftest import PHOTOS, TINY_CLIP
from hf_clip_aft.app import comparison as app
from hf_clip_aft.cli import run_command
from hf_clip_aft.interpret import MAP_METHODS, MapMethod
from hf_clip_aft.interpret.figures import colorize
from hf_clip_aft.release import space
from hf_clip_aft.release.record import TrainingRecord

gradio_client = pytest.importorskip("gradio_client")
CAT = str(Path(PHOTOS) / "cat" / "cat.jpg")
FAST_METHODS = ["simple_gradient", "gradcam"]  # cheap on the tiny model; the registry test covers the rest


@pytest.fixture(scope="module")
def models(tmp_path_factory, aft_stand_in) -> dict[str, str]:
    """The tiny CLIP, a copy with perturbed vision weights (an "AFT" stand-in), and a folder holding a BERT config."""
    folder = tmp_path_factory.mktemp("models")
    BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(
        folder / "bert"
    )
    return {"base": TINY_CLIP, "aft": aft_stand_in, "bert": str(folder / "bert")}


@pytest.fixture(scope="module")
def loaded(models):
    clips, problems = app.load_models([models["base"], models["aft"]], "cpu")
    assert not problems
    return clips


# --- the functions, called directly ---------------------------------------------------------------------------------


def test_parse_prompts_strips_and_dedupes_and_refuses_none():
    assert app.parse_prompts(" cat, dog ,, cat,a photo of a horse ") == ["cat", "dog", "a photo of a horse"]
    for empty in ("", " , ,", None):
        with pytest.raises(ValueError, match="No class prompts"):
            app.parse_prompts(empty)


def test_default_methods_are_the_first_of_each_registered_family():
    chosen = app.default_methods()
    families = [MAP_METHODS[m].family for m in chosen]
    assert sorted(families) == sorted({m.family for m in MAP_METHODS.values()})
    for name in chosen:
        earlier = list(MAP_METHODS)[: list(MAP_METHODS).index(name)]
        assert all(MAP_METHODS[e].family != MAP_METHODS[name].family for e in earlier)


def test_models_that_are_not_clip_are_named_and_the_rest_load(models, tmp_path):
    with pytest.raises(ValueError, match="'bert' model, not a CLIP one"):
        app.check_clip(models["bert"])
    clips, problems = app.load_models([models["bert"], models["base"], str(tmp_path / "missing")], "cpu")
    assert [c.name for c in clips] == [models["base"]]
    assert (
        "not a CLIP" in problems[models["bert"]] and "Cannot read a model config" in problems[str(tmp_path / "missing")]
    )
    with pytest.raises(ValueError, match="names a model twice"):
        app.load_models([models["base"], models["base"]], "cpu")


def test_unreadable_image_is_named_without_its_path(tmp_path):
    bad = tmp_path / "secret-folder" / "notes.jpg"
    bad.parent.mkdir()
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=r"Cannot read 'holiday.jpg' as an image; upload a JPEG") as info:
        app.open_image(bad, "holiday.jpg")
    assert "secret-folder" not in str(info.value)
    assert app.open_image(CAT).mode == "RGB"


def test_heat_colours_are_absolute_and_overlay_blends():
    values = torch.tensor([[0.0, 0.5, 1.0]])
    rgb = app.heat_colours(values)
    assert torch.allclose(rgb[:, 0, 0], torch.zeros(3)) and torch.allclose(rgb[:, 0, 2], torch.ones(3))
    # A value's colour does not depend on the other values (unlike colorize's per-map stretch).
    assert torch.allclose(app.heat_colours(torch.tensor([[0.5, 0.6]]))[:, 0, 0], rgb[:, 0, 1])
    assert torch.allclose(rgb[:, 0, 1], colorize(torch.tensor([[0.0, 0.5, 1.0]]), quantile=1.0)[:, 0, 1])
    image = torch.rand(3, 1, 3)
    assert torch.allclose(app.overlay(image, values * 4, 4.0, 0.0), image)
    assert torch.allclose(app.overlay(image, values * 4, 4.0, 1.0), rgb)
    assert torch.allclose(app.overlay(image, values * 8, 4.0, 1.0)[:, 0, 2], torch.ones(3))  # above the top: white
    with pytest.raises(ValueError, match="opacity=1.5 must be in"):
        app.overlay(image, values, 1.0, 1.5)


def test_compare_probabilities_match_clip_and_maps_share_a_scale(loaded):
    image = Image.open(CAT)
    classes = ["cat", "rocket", "clock"]
    result = app.compare(image, loaded, classes, FAST_METHODS, prompt_style="as typed", size=32)
    for clip, model_result in zip(loaded, result.results):
        # Plain transformers with the processor's normalisation: the same zero-shot probabilities.
        inputs = clip.processor(text=classes, images=image, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = clip.model(**inputs).logits_per_image.softmax(-1)[0]
        got = torch.tensor([model_result.probabilities[c] for c in classes])
        assert torch.allclose(got, expected, atol=1e-4)
        assert list(model_result.probabilities.values()) == sorted(model_result.probabilities.values(), reverse=True)
        assert model_result.target == next(iter(model_result.probabilities))  # default: the top class
        for method in FAST_METHODS:
            assert model_result.maps[method].shape == (32, 32)
            assert model_result.maps[method].mean().item() == pytest.approx(1.0, rel=1e-4)
    assert not torch.allclose(result.results[0].maps["gradcam"], result.results[1].maps["gradcam"])
    tops = [torch.quantile(r.maps["gradcam"].flatten(), app.SCALE_QUANTILE).item() for r in result.results]
    assert result.scale("gradcam") == pytest.approx(max(tops))
    assert result.image.shape == (3, 32, 32)

    explained = app.compare(image, loaded, classes, ["gradcam"], target="clock", size=32)
    assert [r.target for r in explained.results] == ["clock", "clock"]
    with pytest.raises(ValueError, match=r"'dog', is not among the prompts"):
        app.compare(image, loaded, classes, ["gradcam"], target="dog")
    with pytest.raises(ValueError, match="not a registered map method"):
        app.compare(image, loaded, classes, ["no_such_map"])
    with pytest.raises(ValueError, match="No map method chosen"):
        app.compare(image, loaded, classes, [])


def test_a_method_registered_later_is_offered_and_computed(loaded, monkeypatch):
    def centre(model, pixels, text_embeds, *, image_processor, **options):
        maps = torch.zeros(pixels.shape[0], *pixels.shape[-2:])
        maps[:, 24:40, 24:40] = 1
        return maps

    later = MapMethod("centre_box", "Centre box", "training-free", "none", "test method", centre)
    monkeypatch.setitem(MAP_METHODS, later.name, later)
    result = app.compare(Image.open(CAT), loaded[:1], ["cat", "dog"], ["centre_box"], size=64)
    assert result.results[0].maps["centre_box"][32, 32] == pytest.approx(16.0, rel=1e-3)  # the box: 1/16 of the image
    from hf_clip_aft.app.page import build_app

    offered = [c for block in build_app(loaded).blocks.values() for c in getattr(block, "choices", None) or []]
    assert ("Centre box (training-free)", "centre_box") in offered
    assert {name for _, name in offered if name in MAP_METHODS} == set(MAP_METHODS)


def test_figure_layout_and_opacity(loaded):
    result = app.compare(Image.open(CAT), loaded, ["cat", "dog"], FAST_METHODS, size=64)
    clear = app.comparison_figure(result, opacity=0.0)
    size, label, bar = 64, 32, 64
    header = clear.height - 2 * size
    assert clear.width == label + 3 * size + bar and header > 0  # base, AFT, then the difference column
    tile = torch.tensor(list(clear.crop((label + size, header, label + 2 * size, header + size)).getdata()))
    expected = (result.image.permute(1, 2, 0).reshape(-1, 3) * 255).round()
    assert (tile.float() - expected).abs().max() <= 1  # opacity 0: the image itself, in every model's column
    assert app.comparison_figure(result, opacity=1.0).tobytes() != clear.tobytes()


def test_difference_view_is_last_minus_first_on_a_symmetric_scale(loaded):
    colours = app.difference_colours(torch.tensor([[-2.0, -1.0, 0.0, 1.0, 3.0]]), bound=1.0)[:, 0]
    blue, white, red = torch.tensor([30, 90, 200]) / 255, torch.ones(3), torch.tensor([200, 30, 0]) / 255
    for index, colour in [(0, blue), (1, blue), (2, white), (3, red), (4, red)]:  # clipped at ±bound
        assert torch.allclose(colours[:, index], colour), index
    result = app.compare(Image.open(CAT), loaded, ["cat", "dog"], ["gradcam"], size=64)
    same = app.Comparison(result.image, result.methods, [result.results[0], result.results[0]])
    figure = app.comparison_figure(same, opacity=1.0)  # a model against itself: a white difference
    header = figure.height - 64
    difference = torch.tensor(list(figure.crop((32 + 2 * 64, header + 30, 32 + 3 * 64, header + 64)).getdata()))
    assert (difference == 255).all()


def test_random_demo_weights_are_recognised(models, tmp_path):
    assert "random weights" in app.demo_weights_note(TINY_CLIP)
    assert app.demo_weights_note(models["aft"]) is None  # a copy without a training record: not known to be a demo
    assert app.demo_weights_note("openai/clip-vit-base-patch16") is None
    demo = tmp_path / "demo"
    demo.mkdir()
    TrainingRecord(base_model="tiny-clip", base_model_on_hub=False).save(demo)  # what the train demo writes
    assert "offline demo" in app.demo_weights_note(str(demo))
    TrainingRecord(base_model="openai/clip-vit-base-patch16", base_model_on_hub=True).save(demo)
    assert app.demo_weights_note(str(demo)) is None
    (demo / "training_record.json").write_text("{")  # unreadable: no claim either way
    assert app.demo_weights_note(str(demo)) is None


# --- the Space folder ------------------------------------------------------------------------------------------------


def test_space_folder_pins_the_package_and_links_the_models(tmp_path, caplog):
    models = space.space_models([TINY_CLIP, "openai/clip-vit-base-patch16"])
    assert models == ["openai/clip-vit-base-patch16"] and "leaves out" in caplog.text
    folder = space.write_space(tmp_path / "space", "org/demo", ["openai/clip-vit-base-patch16", "org/clip-aft"])
    assert sorted(os.listdir(folder)) == sorted(space.SPACE_FILES)
    assert sorted(os.listdir(tmp_path)) == ["space"]  # no staging folder left behind
    from importlib.metadata import version

    assert (folder / "requirements.txt").read_text() == f"hf_clip_aft[app]=={version('hf_clip_aft')}\n"
    card = space.check_space(folder)
    assert card.data.models == ["openai/clip-vit-base-patch16", "org/clip-aft"] and card.data.sdk == "gradio"
    assert "https://huggingface.co/org/clip-aft" in card.text
    assert "serve(['openai/clip-vit-base-patch16', 'org/clip-aft'])" in (folder / "app.py").read_text()
    assert space.push_space(folder, "org/demo", dry_run=True) is None
    space.write_space(folder, "org/demo", ["org/clip-aft"])  # rewriting replaces the folder
    assert space.check_space(folder).data.models == ["org/clip-aft"]
    with pytest.raises(ValueError, match="local paths; a Space loads models from the Hub"):
        space.write_space(tmp_path / "s2", "org/demo", [TINY_CLIP])
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="holds other files than a Space's"):
        space.write_space(tmp_path / "other", "org/demo", ["org/clip-aft"])


def test_push_with_space_writes_it_lists_it_and_the_card_links_it(models, tmp_path, capsys):
    checkpoint = shutil.copytree(models["aft"], tmp_path / "run")
    argv = ["--checkpoint", str(checkpoint), "--repo_id", "org/clip-aft", "--space", "org/clip-aft-demo"]
    run_command("push", [*argv, "--base_model", "openai/clip-vit-base-patch16", "--dry_run", "true"])
    printed = capsys.readouterr().out
    assert "Would upload to the Space org/clip-aft-demo:" in printed and "requirements.txt" in printed
    card = space.check_space(tmp_path / "run-hub-space")
    assert card.data.models == ["openai/clip-vit-base-patch16", "org/clip-aft"]
    assert "https://huggingface.co/spaces/org/clip-aft-demo" in (tmp_path / "run-hub" / "README.md").read_text()


# --- the real app: gradio_client, then a browser ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(models):
    """The app command, as a user starts it, on a free loopback port; always closed."""
    argv = ["--models", models["base"], models["aft"], models["bert"], "--methods", *FAST_METHODS]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        demo = run_command("app", [*argv, "--host", "127.0.0.1", "--port", str(free_port()), "--block", "false"])
    demo.startup_output = printed.getvalue()
    try:
        yield demo
    finally:
        demo.close()


def test_startup_names_the_address_without_gradios_share_hint(server):
    assert server.startup_output == f"The comparison page runs at {server.local_url}\n"
    assert "share=True" not in server.startup_output


def test_client_predicts_end_to_end_and_gets_messages(server, capfd):
    client = gradio_client.Client(server.local_url, verbose=False)
    top = "each model's top class"
    base, aft, figure = client.predict(
        gradio_client.handle_file(CAT), "cat, dog, rocket", "ensemble", FAST_METHODS, top, 0.5, api_name="/compare"
    )
    for label in (base, aft):
        confidences = {c["label"]: c["confidence"] for c in label["confidences"]}
        assert set(confidences) == {"cat", "dog", "rocket"} and sum(confidences.values()) == pytest.approx(1, abs=1e-4)
    assert base["confidences"] != aft["confidences"]
    with Image.open(figure) as shown:
        assert shown.width > 2 * 224 and shown.height > 2 * 224  # two models' columns, two methods' rows
    bad_image = Path(figure).with_name("broken.png")
    bad_image.write_text("not an image")
    for inputs, message in [
        ((None, "cat, dog"), "No image"),
        ((gradio_client.handle_file(CAT), " , "), "No class prompts"),
        ((gradio_client.handle_file(str(bad_image)), "cat, dog"), "Cannot read 'broken.png' as an image"),
    ]:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(*inputs, "ensemble", FAST_METHODS, top, 0.5, api_name="/compare")
    assert "Traceback" not in capfd.readouterr().err  # the user's mistakes are messages on the page, not stack traces


def test_browser_loads_the_page_and_shows_the_maps(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run does it).")
    outside = []

    def loopback_only(route):
        if route.request.url.startswith(server.local_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.route("**/*", loopback_only)
            page.goto(server.local_url)
            page.get_by_text("is a 'bert' model, not a CLIP one").wait_for(timeout=20_000)  # the model not loaded
            page.locator("#examples button.gallery-item").nth(1).click()  # the cat
            page.locator("#image img").wait_for(timeout=20_000)  # the example is in the image box
            page.get_by_role("button", name="Compare").click()
            figure = page.locator("#figure img")
            figure.wait_for(timeout=30_000)
            page.wait_for_function("document.querySelector('#figure img').naturalWidth > 0", timeout=10_000)
            assert figure.evaluate("img => img.naturalWidth") > 2 * 224
            assert page.get_by_text("tiny-clip-aft: zero-shot probabilities").count() == 1
            banner = page.locator("#demo-weights").inner_text()
            assert "Demo weights" in banner and "tiny-clip: the shipped tiny-clip test model" in banner
            page.screenshot(path=tmp_path / "app.png", full_page=True)
        finally:
            browser.close()
    assert Image.open(tmp_path / "app.png").width == 1400
    assert not [url for url in outside if "favicon" not in url], outside
