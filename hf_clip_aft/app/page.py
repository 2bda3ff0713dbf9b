"""The Gradio page: pick an image and class prompts, see every model's zero-shot probabilities and maps side by side.

The page only wires inputs to :mod:`hf_clip_aft.app.comparison`; models are loaded once, before the page starts, and
every request reuses them. Bad input (no image, an unreadable file, no prompts, no method) comes back as a message on
the page (`gr.Error`, without a traceback in the terminal), models that failed to load are named at the top of the
page, and so are models with random (demo) weights, whose maps mean nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gradio as gr
import torch
from PIL import Image

from ..interpret import MAP_METHODS, get_map_method
from ..interpret.suite import LoadedModel
from .comparison import (
    PROMPT_PRESETS,
    PROMPT_STYLES,
    Comparison,
    compare,
    comparison_figure,
    default_methods,
    demo_weights_note,
    example_images,
    load_models,
    model_label,
    open_image,
    parse_prompts,
)

TOP_CLASS = "each model's top class"
TITLE = "CLIP maps side by side: base vs adversarially fine-tuned (AFT)"
INTRO = """Pick an example image or upload one, type the classes to tell apart (comma-separated) and choose map methods.
Each model classifies the image zero-shot over your classes and explains one class with every method; its maps are
drawn over the image, one column per model, on one colour scale per method (saliency divided by its mean over the
image: 1 is an average pixel). Maps and probabilities come from the `hf_clip_aft` evaluation suite; AFT is the
method of Gong et al., *Boosting the Visual Interpretability of CLIP via Adversarial Fine-tuning*, ICLR 2025."""


def target_choices(prompts: str, current: str | None) -> gr.Dropdown:
    """The 'maps explain' choices for the typed prompts, keeping the current choice when it is still offered."""
    try:
        classes = parse_prompts(prompts)
    except ValueError:
        classes = []
    choices = [TOP_CLASS, *classes]
    return gr.Dropdown(choices=choices, value=current if current in choices else TOP_CLASS)


def build_app(
    models: Sequence[LoadedModel],
    problems: Mapping[str, str] | None = None,
    *,
    methods: Sequence[str] | None = None,
    title: str = TITLE,
) -> gr.Blocks:
    """The page comparing the loaded `models` (in order, base first); `problems` (``{model: why}``) are shown on it.

    `methods` are ticked when the page opens (default: :func:`~hf_clip_aft.app.comparison.default_methods`); every
    registered map method is offered.
    """
    if not models:
        raise ValueError("No model to compare: load at least one CLIP model (load_models).")
    methods = list(methods or default_methods())
    for method in methods:
        get_map_method(method)
    first_preset = next(iter(PROMPT_PRESETS))

    def run(
        image: dict[str, Any] | None,
        prompts: str,
        style: str,
        chosen: list[str],
        target: str | None,
        opacity: float,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - Gradio's way to declare progress
    ) -> tuple:
        try:
            if not image:
                raise ValueError("No image: upload one or pick an example below the image box.")
            picture = open_image(image["path"], image.get("orig_name"))
            classes = parse_prompts(prompts)
            if len(classes) == 1:
                gr.Warning("With one class prompt every probability is 1: add more classes, separated by commas.")
            result = compare(
                picture,
                models,
                classes,
                chosen,
                target=None if target in (None, "", TOP_CLASS) else target,
                prompt_style=style,
            )
        except ValueError as err:  # the user's input: a message on the page, no traceback in the terminal
            raise gr.Error(str(err), print_exception=False) from err
        return *[r.probabilities for r in result.results], comparison_figure(result, opacity), result

    def redraw(result: Comparison | None, opacity: float) -> Image.Image | None:
        return None if result is None else comparison_figure(result, opacity)

    # No analytics calls home: the page works offline, and sends nothing about its use anywhere.
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n\n{INTRO}")
        if problems:
            lines = "\n".join(f"- `{name}`: {why}" for name, why in problems.items())
            gr.Markdown(f"**Not loaded, so not compared:**\n{lines}", elem_id="problems")
        demo_models = {m.name: note for m in models if (note := demo_weights_note(m.name))}
        if demo_models:
            lines = "\n".join(f"- `{model_label(name)}`: {note}" for name, note in demo_models.items())
            gr.Markdown(
                "**Demo weights: these maps and probabilities only show that the page works; they say nothing about "
                f"CLIP or AFT.**\n{lines}",
                elem_id="demo-weights",
            )
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    type="filepath", label="Image", sources=["upload", "clipboard"], height=260, elem_id="image"
                )
                gr.Examples(
                    [[str(p)] for p in example_images()], inputs=image, label="Example images", elem_id="examples"
                )
                preset = gr.Dropdown(list(PROMPT_PRESETS), value=first_preset, label="Preset classes")
                prompts = gr.Textbox(PROMPT_PRESETS[first_preset], label="Class prompts, comma-separated")
                style = gr.Radio(
                    list(PROMPT_STYLES),
                    value=next(iter(PROMPT_STYLES)),
                    label="Prompts: each class in the 7-template ensemble, or exactly as typed",
                )
                target = gr.Dropdown(
                    [TOP_CLASS, *parse_prompts(PROMPT_PRESETS[first_preset])],
                    value=TOP_CLASS,
                    label="Maps explain",
                )
                chosen = gr.CheckboxGroup(
                    [(f"{m.label} ({m.family})", m.name) for m in MAP_METHODS.values()],
                    value=methods,
                    label="Map methods",
                )
                button = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column(scale=2):
                with gr.Row():
                    probabilities = [
                        gr.Label(num_top_classes=5, label=f"{model_label(m.name)}: zero-shot probabilities")
                        for m in models
                    ]
                figure = gr.Image(
                    type="pil",
                    format="png",
                    label="Maps over the image (one colour scale per method)",
                    show_label=False,  # the label would sit on the figure's model names
                    interactive=False,
                    buttons=["download", "fullscreen"],
                    elem_id="figure",
                )
                opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Map opacity over the image")
        preset.change(lambda name: PROMPT_PRESETS[name], preset, prompts, api_visibility="private")
        prompts.change(target_choices, [prompts, target], target, api_visibility="private")
        button.click(
            run,
            [image, prompts, style, chosen, target, opacity],
            [*probabilities, figure, state],
            api_name="compare",
            # Inputs come unprocessed (the image as its uploaded file), so that an unreadable file is reported by
            # open_image as a message rather than by Gradio's image decoder as a processing error.
            preprocess=False,
            concurrency_limit=1,  # the models are shared, and map methods toggle their gradients and hooks
        )
        opacity.release(redraw, [state, opacity], figure, api_visibility="private")
    return demo


def serve(
    models: Sequence[str],
    *,
    device: str | None = None,
    methods: Sequence[str] | None = None,
    host: str | None = None,
    port: int | None = None,
    block: bool = True,
    title: str = TITLE,
) -> gr.Blocks:
    """Load `models` once (CLIPModel folders or Hub ids, base first) and start the page.

    Args:
        models: the models to compare, in column order.
        device: torch device; default the GPU when there is one, else the CPU.
        methods: map methods ticked when the page opens.
        host: address to listen on; default Gradio's (``GRADIO_SERVER_NAME``, else 127.0.0.1, local only).
        port: port; default Gradio's (``GRADIO_SERVER_PORT``, else the first free one from 7860).
        block: wait until interrupted (Ctrl-C); False returns once the server runs (tests, notebooks).
        title: the page's title.

    Returns:
        The running page (``.close()`` stops it).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded, problems = load_models(models, device)
    if not loaded:
        reasons = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise ValueError(f"None of the models loaded ({reasons}). Give CLIPModel folders or Hub ids.")
    demo = build_app(loaded, problems, methods=methods, title=title)
    demo.queue()
    # quiet: Gradio's start-up lines end with a hint to set share=True (a public link); this page never makes one.
    demo.launch(server_name=host, server_port=port, share=False, show_error=True, quiet=True, prevent_thread_lock=True)
    print(f"The comparison page runs at {demo.local_url}" + (" (Ctrl-C stops it)" if block else ""), flush=True)
    if block:
        demo.block_thread()
    return demo
