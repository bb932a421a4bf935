"""The studio layout: four generation tabs, shared model/sampling/memory panels, the result and the session gallery.

`build_studio()` returns the Blocks; `pyramid_app.studio.serve` launches it. The generation handlers live in
`endpoints`, the model menu in `catalog`, the session outputs in `gallery`.
"""
import functools
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import torch

from model_core.checkpoints import VARIANTS
from model_core.memory import resolve_device
from model_core.option_names import compile_name
from model_core.speed import speed_choices
from model_core.step_cache import CACHE_MODES

from . import bundled_prompts, gallery
from ..options import limits
from ..options.catalog import ModelMenu, length_limits
from .endpoints import (IMAGE_GUIDANCE, LORA_WEIGHT_MAX, NUMBER_CHECKS, Endpoints, checked_frames, output_thumbnails,
                        refusal, storyboard_frames, storyboard_of)
from .outputs import OUTPUT_MAX_AGE, SWEEP_INTERVAL
from .replies import reply
from .blocks import StudioBlocks
from ..options.settings import (
    ATTENTION_BACKENDS,
    BUNDLED_MODELS,
    DTYPES,
    OFFLOAD_MODES,
    QUANTIZE_MODES,
    STAGE_COUNT,
    ModelOptions,
    fresh_seed,
    memory_choices,
)
from .uploads import HOSTED_DECODE_BYTES
from .queue_panel import ADDRESS_QUEUE_CAP, QUEUE_HEADERS, QUEUED_JOB_MAX_AGE, SUBMISSIONS_PER_MINUTE

GENERATION_QUEUE = "generation"  # one concurrency group: one generation at a time on this device
PLACEHOLDER_SPEC = VARIANTS["384p"]  # length limits until a model with known limits is picked
THEME = gr.themes.Soft(primary_hue="indigo")
CSS = ("#frames .thumbnail-item { min-width: 48px; }\n"
       "#result-image img { width: 100%; height: 360px; object-fit: contain; image-rendering: pixelated; }\n"
       # the outputs' captions in full, under each thumbnail rather than cut to one line over it
       "#outputs .thumbnail-item { aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }\n"
       "#outputs .thumbnail-item video, #outputs .thumbnail-item img { aspect-ratio: 1; height: auto; flex: none; }\n"
       "#outputs .thumbnail-item > svg { top: 35%; width: 30%; height: 30%; }\n"
       "#outputs .caption-label { position: static; max-width: none; white-space: normal; overflow-wrap: anywhere; "
       "border: none; border-top: 1px solid var(--border-color-primary); border-radius: 0; opacity: 1; }")
HELPERS = dict(api_visibility="private", queue=False)
QUEUED_HELPER = dict(api_visibility="private", concurrency_limit=None, show_progress="hidden")  # may show a toast
HOSTED_CAPS_TEXT = (f" Here a clip may take at most {HOSTED_DECODE_BYTES >> 20} MiB once scaled to the model's size "
                    f"(at 768p: {HOSTED_DECODE_BYTES // (1280 * 768 * 3)} frames); outputs are kept for "
                    f"{OUTPUT_MAX_AGE / 3600:g} hours at unguessable addresses.")
LOCAL_QUEUE_TEXT = ("Jobs added with **Add to queue** run one after another, also when this tab is closed; the queue is "
                    "saved in the output folder and survives a restart. `python -m pyramid_app run-queue FILE` runs an "
                    "exported queue without the studio.")
HOSTED_QUEUE_TEXT = ("Jobs added with **Add to queue** run one after another, also when this tab is closed, while the "
                     f"server runs: at most {ADDRESS_QUEUE_CAP} waiting per visitor, {SUBMISSIONS_PER_MINUTE} added a "
                     f"minute, and a job that waits over {QUEUED_JOB_MAX_AGE / 60:g} minutes expires.")


def build_studio(default_model=None, output_dir="outputs", pipelines=None, models=None, hosted=False,
                 lora_dir=None) -> gr.Blocks:
    """The studio UI; `default_model` (or the first of `models`) is a checkpoint folder or hub id (default: the
    bundled model). `hosted`: models from the allow-list only, outputs per session, old files swept. The LoRAs
    in `lora_dir` (the operator's: adapter folders, .safetensors files) are offered with a weight slider."""
    menu = ModelMenu(models if models is not None else [default_model] if default_model else [], hosted=hosted)
    endpoints = Endpoints(output_dir=output_dir, pipelines=pipelines, menu=menu, lora_dir=lora_dir)
    facts = menu.facts(menu.default)
    if facts.variants and menu.is_local(menu.default):
        endpoints.pipelines.warm_up(ModelOptions(model=menu.source_for(menu.default), dtype=_default_dtype()))
    delete_cache = (SWEEP_INTERVAL, OUTPUT_MAX_AGE) if hosted else None
    with StudioBlocks(title="Pyramid Flow Studio", delete_cache=delete_cache) as demo:
        parts = _layout(menu, endpoints, facts, hosted)
        _wire_generation(parts, endpoints)
        _wire_model_menu(parts, menu, facts, hosted)
        _wire_outputs(parts, endpoints, menu)
        queue_outputs = [parts.queue_table, parts.queue_paused, parts.queue_panel, parts.queue_export, parts.history,
                         parts.outputs]
        gr.Timer(2.0).tick(endpoints.queue_view, parts.history, queue_outputs, **QUEUED_HELPER)  # finished jobs: a toast
        demo.load(functools.partial(endpoints.queue_view, announce=False), parts.history, queue_outputs, **QUEUED_HELPER)
    endpoints.admit_uploads_of(demo)
    return demo


class StudioParts(SimpleNamespace):
    """The components the studio's events connect, by name (see `_layout`)."""

    def tab_controls(self, mode) -> dict:
        return _tab_controls(self.controls, self.storyboards, self.image_guidance, mode)


def _layout(menu, endpoints, facts, hosted) -> StudioParts:
    """Every component, placed: the tabs and panels on the left, the result on the right, the queue and the session's
    outputs below."""
    spec = facts.spec("auto") or PLACEHOLDER_SPEC
    gr.Markdown("# Pyramid Flow Studio\nVideo generation with Pyramidal Flow Matching.")
    gr.Markdown(limits.CAPS_TEXT + (HOSTED_CAPS_TEXT if hosted else ""), elem_id="caps")
    parts = StudioParts(model_note=gr.Markdown(facts.note, elem_id="model-note"), history=gr.State([]),
                        selected=gr.State(None))
    with gr.Row():
        with gr.Column(scale=5):
            (parts.tabs, parts.inputs, parts.buttons, parts.lengths, parts.queue_buttons, parts.storyboards,
             parts.prompt_notes, parts.grammars) = _mode_tabs(spec, _is_bundled(menu, menu.default))
            parts.stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            parts.controls = {**_model_panel(menu, facts), **_lora_panel(endpoints.loras), **_sampling_panel(facts.sampling),
                              **_memory_panel(), **_speed_panel(facts.sampling, hosted)}
            parts.image_guidance = parts.controls.pop(IMAGE_GUIDANCE)  # the image tab's video_guidance_scale
        with gr.Column(scale=6):
            parts.status = gr.Markdown("Ready.", label="Status", elem_id="status")
            parts.result_video = gr.Video(label="Result", buttons=["download"], autoplay=True, loop=True,
                                          interactive=False, elem_id="result-video")
            parts.result_image = gr.Image(label="Result", type="filepath", buttons=["download"], interactive=False,
                                          visible=False, elem_id="result-image")
            parts.seed_used = gr.Textbox(label="Seed used", interactive=False, elem_id="seed-used")
            parts.frames = gr.Gallery(label="Frames", columns=9, height=220,
                                      object_fit="contain", fit_columns=False, elem_id="frames")
    parts.queue_panel, parts.queue_table, parts.queue_status, parts.queue_paused, parts.queue_export = _queue_panel(
        endpoints)
    with gr.Accordion("This session's outputs", open=True):
        with gr.Row():
            parts.outputs = gr.Gallery(label="Outputs", show_label=False, columns=4, height=380, allow_preview=False,
                                       fit_columns=False, elem_id="outputs")
            with gr.Column():
                parts.selected_settings = gr.JSON(label="Settings of the selected output")
                parts.reuse_button = gr.Button("Reuse settings", elem_id="reuse")
                parts.reuse_file = gr.File(label="…or reuse the settings of a file made here or by the CLI",
                                           file_types=[".mp4", ".png", ".json"], elem_id="reuse-file")
    return parts


def _wire_generation(parts: StudioParts, endpoints) -> None:
    """Generate, Add to queue and Stop: the API endpoints, each taking its tab's inputs and the shared controls."""
    for mode, button in parts.queue_buttons.items():
        button.click(getattr(endpoints, f"queue_{mode}"), parts.inputs[mode], [parts.queue_table, parts.queue_status],
                     api_name=f"queue_{mode}", inputs_kwargs=parts.tab_controls(mode),
                     concurrency_limit=None, preprocess=False,  # the handlers check raw values
                     ).then(endpoints.queue_badge, None, parts.queue_panel, **HELPERS)
    results = {mode: parts.result_image if mode == "text_to_image" else parts.result_video for mode in gallery.MODE_LABELS}
    for mode, button in parts.buttons.items():
        button.click(lambda image_mode=mode == "text_to_image": (gr.update(visible=not image_mode),
                                                                 gr.update(visible=image_mode)),
                     None, [parts.result_video, parts.result_image], **HELPERS)
        button.click(getattr(endpoints, mode), [*parts.inputs[mode], parts.history],
                     [results[mode], parts.frames, parts.status, parts.seed_used, parts.history], api_name=mode,
                     inputs_kwargs=parts.tab_controls(mode), concurrency_id=GENERATION_QUEUE, concurrency_limit=1,
                     show_progress_on=[results[mode]], preprocess=False,  # the handlers check raw values
                     ).then(gallery.gallery_items, parts.history, parts.outputs, **HELPERS)
    parts.stop_button.click(endpoints.stop, None, parts.status, api_name="stop", concurrency_limit=None,
                            show_progress="hidden")


def _wire_model_menu(parts: StudioParts, menu, facts, hosted) -> None:
    """What follows the model menu: its note, variants and length limits, its sampling defaults, the bundled model's
    prompt grammar and unseen-word notes, and the length notes."""
    controls, lengths_fields = parts.controls, {mode: parts.inputs[mode][-1] for mode in parts.lengths}

    def limits_for(choice, variant):
        """The model's note, and the length fields' ranges for its variant (their values stay as typed)."""
        spec = menu.facts(choice).spec(variant)
        return [menu.facts(choice).note, *(_length_field_update(spec, mode == "extend_video") for mode in lengths_fields)]

    def model_changed(choice, variant):
        variants = ["auto", *menu.facts(choice).variants]
        variant = variant if variant in variants else "auto"
        return [gr.update(choices=variants, value=variant), *limits_for(choice, variant),
                *(gr.update(visible=_is_bundled(menu, choice)) for _ in parts.grammars)]

    model_inputs = [controls["model"], controls["variant"]]
    controls["model"].change(model_changed, model_inputs, [controls["variant"], parts.model_note,
                                                           *lengths_fields.values(), *parts.grammars], **HELPERS)
    sampling_fields = {**controls, IMAGE_GUIDANCE: parts.image_guidance}
    sampling_controls = [sampling_fields[name] for name in sampling_values(facts.sampling)]
    controls["model"].input(lambda choice: model_sampling(menu.facts(choice)), controls["model"], sampling_controls,
                            **HELPERS)  # a pick, not a reuse
    controls["variant"].change(limits_for, model_inputs, [parts.model_note, *lengths_fields.values()], **HELPERS)
    for mode, field in lengths_fields.items():
        def note(choice, variant, frames, table=None, extension=mode == "extend_video"):
            return _length_note(menu.facts(choice).spec(variant), frames, table, extension, not hosted)

        sources = [*model_inputs, field, *([parts.storyboards[mode]] if mode in parts.storyboards else [])]
        gr.on([source.change for source in sources], note, sources, parts.lengths[mode], preprocess=False, **HELPERS)
    for mode, prompt_note in parts.prompt_notes.items():
        prompt = parts.inputs[mode][0 if mode in ("text_to_video", "text_to_image") else 1]
        gr.on([prompt.change, controls["model"].change],
              lambda text, choice: bundled_prompts.unseen_words_note(text) if _is_bundled(menu, choice) else "",
              [prompt, controls["model"]], prompt_note, **HELPERS)


def _wire_outputs(parts: StudioParts, endpoints, menu) -> None:
    """The session's outputs: picking one shows it with its frames and settings; Reuse fills the controls from it or
    from an uploaded file."""

    def select_output(entries, event: gr.SelectData):
        """The picked output in the Result pane with its frames, its settings, and what it is in the status line."""
        entry = entries[event.index]
        path, image = entry["path"], entry["path"].endswith(".png")
        try:
            strip = output_thumbnails(path)
        except (ValueError, OSError) as error:
            raise gr.Error(reply(error), print_exception=False) from None
        shown = f"Showing `{Path(path).name}`: {gallery.caption(entry['settings'], limits.PROMPT_CHARS)}"
        return (path, entry["settings"], gr.update(value=None if image else path, visible=not image),
                gr.update(value=path if image else None, visible=image), strip, shown,
                str(entry["settings"].get("seed", "")))

    def reuse(path, request: gr.Request):
        if not path:
            raise gr.Error("Select an output in the gallery (or upload one) first.", print_exception=False)
        try:
            settings = gallery.saved_settings(endpoints.client_file(path, request, "file to reuse"))
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(reply(error), print_exception=False) from None
        return _reuse_updates(settings, menu, parts.tabs, parts.inputs, parts.tab_controls, parts.status,
                              parts.storyboards)

    reuse_targets = [parts.tabs, parts.status, *parts.controls.values(), parts.image_guidance,
                     *parts.storyboards.values(), *(component for group in parts.inputs.values() for component in group)]
    parts.outputs.select(select_output, parts.history,
                         [parts.selected, parts.selected_settings, parts.result_video, parts.result_image, parts.frames,
                          parts.status, parts.seed_used], **HELPERS)
    parts.reuse_button.click(reuse, parts.selected, reuse_targets, **HELPERS)
    parts.reuse_file.upload(reuse, parts.reuse_file, reuse_targets, **HELPERS)


def _mode_tabs(spec, bundled: bool) -> tuple:
    """The four tabs: per mode its API inputs (upload, prompt, length), Generate button, length note and a note on
    words the bundled model never saw; the text tabs also show the bundled model's prompt form (`grammars`)."""
    inputs, buttons, lengths, queue_buttons, storyboards, prompt_notes, grammars = {}, {}, {}, {}, {}, {}, []
    with gr.Tabs(selected="text_to_video") as tabs:
        with gr.Tab("Text → Video", id="text_to_video"):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Describe the video", elem_id="t2v-prompt")
            prompt_notes["text_to_video"] = gr.Markdown("", elem_id="t2v-prompt-note")
            grammars.append(_prompt_grammar(prompt, bundled, "t2v-grammar"))
            storyboards["text_to_video"] = _storyboard_table("t2v-storyboard")
            inputs["text_to_video"] = [prompt, _frames_field(spec, "Duration (frames)", "t2v-frames")]
            lengths["text_to_video"] = gr.Markdown(_length_note(spec, spec.max_frames), elem_id="t2v-length")
            buttons["text_to_video"] = gr.Button("Generate video", variant="primary", elem_id="t2v-generate")
            queue_buttons["text_to_video"] = gr.Button("Add to queue", elem_id="t2v-queue")
        with gr.Tab("Image → Video", id="image_to_video"):
            image = gr.Image(label="Image to animate", type="filepath", sources=["upload", "clipboard"], elem_id="i2v-image")
            prompt = gr.Textbox("", label="Prompt (optional)", lines=2, placeholder="How should it move?")
            prompt_notes["image_to_video"] = gr.Markdown("", elem_id="i2v-prompt-note")
            storyboards["image_to_video"] = _storyboard_table("i2v-storyboard")
            inputs["image_to_video"] = [image, prompt, _frames_field(spec, "Duration (frames)", "i2v-frames")]
            lengths["image_to_video"] = gr.Markdown(_length_note(spec, spec.max_frames), elem_id="i2v-length")
            buttons["image_to_video"] = gr.Button("Animate image", variant="primary", elem_id="i2v-generate")
            queue_buttons["image_to_video"] = gr.Button("Add to queue", elem_id="i2v-queue")
        with gr.Tab("Extend a video", id="extend_video"):
            video = gr.Video(label="Clip to continue", sources=["upload"], include_audio=True, elem_id="extend-video")
            prompt = gr.Textbox("", label="Prompt (optional)", lines=2, placeholder="What happens next?")
            prompt_notes["extend_video"] = gr.Markdown("", elem_id="extend-prompt-note")
            new_frames = _frames_field(spec, "New frames", "extend-frames", extension=True)
            inputs["extend_video"] = [video, prompt, new_frames]
            lengths["extend_video"] = gr.Markdown(_length_note(spec, new_frames.value, extension=True),
                                                  elem_id="extend-length")
            buttons["extend_video"] = gr.Button("Extend video", variant="primary", elem_id="extend-generate")
            queue_buttons["extend_video"] = gr.Button("Add to queue", elem_id="extend-queue")
        with gr.Tab("Text → Image", id="text_to_image"):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Describe the image", elem_id="t2i-prompt")
            prompt_notes["text_to_image"] = gr.Markdown("", elem_id="t2i-prompt-note")
            grammars.append(_prompt_grammar(prompt, bundled, "t2i-grammar"))
            inputs["text_to_image"] = [prompt]
            buttons["text_to_image"] = gr.Button("Generate image", variant="primary", elem_id="t2i-generate")
            queue_buttons["text_to_image"] = gr.Button("Add to queue", elem_id="t2i-queue")
    return tabs, inputs, buttons, lengths, queue_buttons, storyboards, prompt_notes, grammars


def _prompt_grammar(prompt, bundled: bool, elem_id) -> gr.Column:
    """The bundled model's prompt form and examples that fill `prompt` when clicked; shown while it is picked."""
    with gr.Column(visible=bundled, elem_id=elem_id) as grammar:
        gr.Markdown(bundled_prompts.GRAMMAR_TEXT)
        gr.Examples([[text] for text in bundled_prompts.EXAMPLE_PROMPTS], prompt, label="Examples (click one)",
                    cache_examples=False)
    return grammar


def _is_bundled(menu, choice) -> bool:
    """Whether the menu value names a bundled model (its menu entry or its folder): they share the shapes world's words."""
    try:
        source = menu.source_for(choice)
    except ValueError:
        return False
    folders = {folder.resolve() for folder in BUNDLED_MODELS.values()}
    return source is None or source in BUNDLED_MODELS or Path(source).expanduser().resolve() in folders


def _tab_controls(controls, storyboards, image_guidance, mode) -> dict:
    """The controls of one tab's endpoints by parameter name: the shared ones, the tab's segment table as
    `storyboard` where it has one, and for image-to-video its own video guidance (the model's default for animating
    an image: 4 for the published models, as in the authors' code)."""
    tab = {**controls, "storyboard": storyboards[mode]} if mode in storyboards else dict(controls)
    if mode == "image_to_video":
        tab["video_guidance_scale"] = image_guidance
    return tab


def _storyboard_table(elem_id) -> gr.Dataframe:
    """The segment table under the prompt: filled rows replace the prompt and the length (one row = one prompt),
    with a button adding a row."""
    table = gr.Dataframe(headers=["seconds", "prompt"], datatype=["number", "str"], type="array", row_count=1,
                         column_count=2, interactive=True, value=[[None, ""]],
                         label="Storyboard (optional): a prompt per segment; filled rows replace the prompt and the length",
                         elem_id=elem_id)
    add_row = gr.Button("Add a segment", size="sm", elem_id=f"{elem_id}-add")
    add_row.click(lambda rows: [*(rows or []), [None, ""]], table, table, **HELPERS)
    return table


def _queue_panel(endpoints) -> tuple:
    """The queue: its jobs, what to do with them, export / import. Its title says what it holds; the studio refreshes
    it, the table and the export file every 2 s while the app is open."""
    with gr.Accordion("Queue", open=False, elem_id="queue") as panel:
        gr.Markdown(HOSTED_QUEUE_TEXT if endpoints.menu.hosted else LOCAL_QUEUE_TEXT)
        table = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True, elem_id="queue-table")
        status = gr.Markdown("", elem_id="queue-status")
        with gr.Row():
            position = gr.Number(1, label="Job #", precision=0, minimum=1, scale=1, elem_id="queue-position")
            buttons = {action: gr.Button(label, size="sm", elem_id=f"queue-{action}")
                       for action, label in (("up", "Move up"), ("down", "Move down"), ("remove", "Remove"))}
        with gr.Row():
            paused = gr.Checkbox(False, label="Paused (the running job finishes, no other starts)", elem_id="queue-paused")
            clear = gr.Button("Clear finished", size="sm", elem_id="queue-clear")
            export = gr.DownloadButton("Export queue", size="sm", elem_id="queue-export")  # its file kept current
            upload = gr.UploadButton("Import queue", file_types=[".json"], size="sm", elem_id="queue-import",
                                     visible=not endpoints.menu.hosted)
    for action, button in {**buttons, "clear": clear}.items():
        button.click(_queue_action(endpoints, action), position, table, **HELPERS)

    def pause_or_resume(value, request: gr.Request):
        return endpoints.queue_action("pause" if value else "resume", None, request)

    paused.input(pause_or_resume, paused, table, **HELPERS)
    upload.upload(endpoints.import_queue, upload, table, **HELPERS)
    return panel, table, status, paused, export


def _queue_action(endpoints, action):
    def act(position, request: gr.Request):
        return endpoints.queue_action(action, position, request)

    return act


def _frames_field(spec, label, elem_id, extension=False) -> gr.Number:
    """A length typed or stepped through the lengths the model makes; a value it cannot make is kept as typed, and
    the note under it says why it would be refused."""
    low, high, step = length_limits(spec, extension)
    return gr.Number(low if extension else high, minimum=low, maximum=high, step=step, label=label,
                     info=f"{low} to {high}, in steps of {step}", interactive=high > low, elem_id=elem_id)


def _length_field_update(spec, extension):
    if spec is None:
        return gr.skip()
    low, high, step = length_limits(spec, extension)
    return gr.update(minimum=low, maximum=high, step=step, info=f"{low} to {high}, in steps of {step}",
                     interactive=high > low)


def _length_note(spec, frames, table=None, extension=False, long_video=False) -> str:
    """How long the video will be: from the storyboard's seconds when it has a filled row, else from `frames`; or the
    sentence a generation would be refused with."""
    if spec is None:
        return ""
    what = "new frames" if extension else "frames"
    try:
        storyboard = storyboard_of(table)
        if storyboard is not None:
            count = storyboard_frames(storyboard, spec, extension, long_video)
            segments = len(storyboard.segments)
            plural = "s" if segments > 1 else ""
            return (f"Storyboard: {segments} segment{plural}, {storyboard.seconds:g} s → {count} {what} ≈ "
                    f"{count / spec.fps:.1f} s at {spec.fps} fps (the storyboard sets the length)")
        count = checked_frames(frames, spec, extension)
    except ValueError as error:
        return f"⚠️ {reply(error)}"
    return f"{count} {what} ≈ {count / spec.fps:.1f} s at {spec.fps} fps"


def _number_field(name, value, low, high, step, label, **options) -> gr.Number:
    """A number control of the endpoints' `name`: typed values are kept as typed, never clamped (see `_checked`)."""
    return gr.Number(value, minimum=low, maximum=high, step=step, label=label, elem_id=name.replace("_", "-"),
                     **options)


def _checked(fields: dict, elem_id) -> gr.Markdown:
    """A note under number controls: the sentence the endpoints would refuse each value with, as soon as it is typed."""
    note = gr.Markdown("", elem_id=elem_id)

    def refusals(*values):
        sentences = [refusal(NUMBER_CHECKS[name], value) for name, value in zip(fields, values)]
        return "\n\n".join(f"⚠️ {sentence}" for sentence in sentences if sentence)

    gr.on([field.change for field in fields.values()], refusals, list(fields.values()), note, preprocess=False,
          **HELPERS)
    return note


def _model_panel(menu, facts) -> dict:
    info = ("the models this studio offers" if menu.hosted else
            "the bundled model, a Hugging Face Hub repo (downloaded on first use) or a local folder")
    with gr.Accordion("Model", open=True):
        model = gr.Dropdown(menu.choices(), value=menu.default, allow_custom_value=not menu.hosted, label="Model",
                            info=info, elem_id="model")
        variant = gr.Dropdown(["auto", *facts.variants], value="auto", label="Resolution variant", elem_id="variant")
    return {"model": model, "variant": variant}


def _lora_panel(loras) -> dict:
    """A LoRA from the operator's folder and its weight; hidden when the studio was started without --lora-dir."""
    with gr.Accordion("LoRA", open=False, visible=bool(loras)):
        lora = gr.Dropdown([gallery.NO_LORA, *loras], value=gallery.NO_LORA, label="LoRA", elem_id="lora",
                           info="adapters in the studio's LoRA folder (--lora-dir)")
        weight = _number_field("lora_weight", 1.0, 0, LORA_WEIGHT_MAX, 0.05, f"LoRA weight (0 to {LORA_WEIGHT_MAX:g})")
        _checked({"lora_weight": weight}, "lora-note")
    return {"lora": lora, "lora_weight": weight}


def sampling_values(sampling) -> dict:
    """Sampling-panel control name -> the model's default value."""
    image = sampling.for_mode("image_to_video").video_guidance_scale
    return {**gallery.sampling_controls(asdict(sampling)), IMAGE_GUIDANCE: image}


def model_sampling(facts) -> list:
    """The sampling panel's values (in `sampling_values` order) for the model picked in the menu."""
    return list(sampling_values(facts.sampling).values())


def _sampling_panel(sampling) -> dict:
    with gr.Accordion("Sampling", open=False):
        negative_prompt = gr.Textbox("", label="Negative prompt", placeholder="what to steer away from")
        with gr.Row():
            seed = gr.Textbox("", label="Seed", placeholder="random", scale=4, elem_id="seed")
            randomize = gr.Button("Randomise", scale=1, elem_id="randomize")
        randomize.click(lambda: str(fresh_seed()), None, seed, **HELPERS)
        defaults = sampling_values(sampling)
        low, high = limits.GUIDANCE_RANGE
        with gr.Row():
            guidance = _number_field("guidance_scale", defaults["guidance_scale"], low, high, 0.5,
                                     f"Guidance, first frame ({low:g} to {high:g})")
            video_guidance = _number_field("video_guidance_scale", defaults["video_guidance_scale"], low, high, 0.5,
                                           f"Video guidance, later frames ({low:g} to {high:g})")
            image_guidance = _number_field(IMAGE_GUIDANCE, defaults[IMAGE_GUIDANCE], low, high, 0.5,
                                           f"… when animating an image ({low:g} to {high:g})")
        steps = {}
        for name, label in (("first_frame_steps", "First-frame steps"), ("video_steps", "Video steps")):
            gr.Markdown(f"**{label}** per pyramid stage (low → full resolution; {limits.STEPS_RANGE[0]} to "
                        f"{limits.STEPS_RANGE[1]} each)")
            with gr.Row():
                for stage in range(STAGE_COUNT):
                    control = gallery.step_control(name, stage)
                    steps[control] = _number_field(control, defaults[control], *limits.STEPS_RANGE, 1,
                                                   f"stage {stage + 1}", min_width=80)
        _checked({"seed": seed, "guidance_scale": guidance, "video_guidance_scale": video_guidance,
                  IMAGE_GUIDANCE: image_guidance, **steps}, "sampling-note")
    return {"negative_prompt": negative_prompt, "seed": seed, "guidance_scale": guidance,
            "video_guidance_scale": video_guidance, IMAGE_GUIDANCE: image_guidance, **steps}


def _memory_panel() -> dict:
    device = resolve_device(None)
    choices = memory_choices(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    with gr.Accordion("Memory", open=False):
        gr.Markdown(f"Running on **{name}**; only the options that work here are offered.")
        dtype = gr.Radio(choices["dtype"], value=_default_dtype(), label="dtype",
                         info=_unavailable("dtype", choices, device))
        offload = gr.Radio(choices["offload"], value="none", label="Offload", interactive=len(choices["offload"]) > 1,
                           info=_unavailable("offload", choices, device))
        quantize = gr.Radio(choices["quantize"], value="none", label="Quantization",
                            info=_unavailable("quantize", choices, device))
        vae_tiling = gr.Checkbox(False, label="VAE tiling (decode in tiles to save memory)")
    return {"dtype": dtype, "offload": offload, "quantize": quantize, "vae_tiling": vae_tiling}


def _speed_panel(sampling, hosted: bool) -> dict:
    """Step cache, attention backend and compiling: like Memory, only what works on this device is offered; a hosted
    studio keeps the attention backend and compiling at the server's setting (they rebuild the shared model)."""
    device = resolve_device(None)
    choices = speed_choices(device)
    if hosted:
        choices = {**choices, "attention_backend": (limits.SERVER_SPEED["attention_backend"],), "compile": (False,)}
    with gr.Accordion("Speed", open=False):
        gr.Markdown("Faster generation without retraining; the choices are recorded in each output's settings.")
        cache = gr.Radio(list(choices["cache"]), value=CACHE_MODES[0], label="Step cache",
                         info="when the first block's output barely changed since the last step, first-block reuses "
                              "the rest of the network's last result and taylorseer extrapolates it from the last two; "
                              "mag skips the whole network while its output's magnitude, calibrated on the first "
                              "unit, barely changes (reset at every stage, unit and guidance branch)")
        low, high = limits.CACHE_THRESHOLD_RANGE
        cache_threshold = _number_field("cache_threshold", sampling.cache_threshold, low, high, 0.01,
                                        f"Cache threshold, {low:g} to {high:g} (0 never skips; higher is faster and "
                                        "less exact)")
        _checked({"cache_threshold": cache_threshold}, "speed-note")
        attention_backend = gr.Radio(list(choices["attention_backend"]), value=limits.SERVER_SPEED["attention_backend"],
                                     label="Attention backend",
                                     info="the server's on a hosted studio" if hosted else _unavailable(
                                         "attention_backend", choices, device))
        compile = gr.Radio([compile_name(level) for level in choices["compile"]], value=compile_name(False),
                           label="Compile", info=_compile_info(device, hosted))
    return {"cache": cache, "cache_threshold": cache_threshold, "attention_backend": attention_backend,
            "compile": compile}


def _default_dtype() -> str:
    """bfloat16 on an accelerator that has it (the published weights' dtype), else the first that works."""
    device = resolve_device(None)
    dtypes = memory_choices(device)["dtype"]
    return "bfloat16" if device.type != "cpu" and "bfloat16" in dtypes else dtypes[0]


def _compile_info(device, hosted: bool) -> str:
    """What the Compile control does, and on a CPU what it costs there (benchmarks/RESULTS.md, "Shape buckets and
    compile levels": tens of seconds per shape, and a slower step than eager on the tests' tiny model)."""
    info = ("torch.compile the whole transformer forward: on compiles it once per input shape, the history padded to "
            "a few shapes (the first units are slower); max also captures CUDA graphs (CUDA GPUs only)")
    if device.type == "cpu":
        info += ("; on a CPU each new shape takes tens of seconds to compile, and at small model sizes the compiled "
                 "step has measured slower than off")
    return info + ("; the server's on a hosted studio" if hosted else "")


def _unavailable(name, choices, device) -> str:
    every = {"dtype": DTYPES, "offload": OFFLOAD_MODES, "quantize": QUANTIZE_MODES,
             "attention_backend": ATTENTION_BACKENDS}[name]
    missing = [value for value in every if value not in choices[name]]
    return f"not available on {device.type}: {', '.join(missing)}" if missing else None


def _reuse_updates(settings, menu, tabs, inputs, tab_controls, status, storyboards) -> dict:
    """Control updates from an output's settings (`tab_controls(mode)`: the controls of the output's tab); values
    this device or model menu cannot take are kept."""
    values = gallery.control_values(settings)
    values["model"] = menu.choice_for(settings.get("model"))
    mode = settings["mode"]
    controls = tab_controls(mode)
    updates = {tabs: gr.Tabs(selected=mode), status: f"Loaded the settings of a {gallery.caption(settings)}"}
    for name, component in controls.items():
        if name not in values:
            continue
        offered = [choice[1] for choice in getattr(component, "choices", None) or []]
        if (isinstance(component, gr.Radio) or name == "lora") and values[name] not in offered:
            continue
        updates[component] = gr.update(value=values[name])
    updates[controls["variant"]] = gr.update(choices=["auto", *menu.facts(values["model"]).variants],
                                             value=values.get("variant", "auto"))
    prompt = inputs[mode][0 if mode in ("text_to_video", "text_to_image") else 1]
    updates[prompt] = values.get("prompt", "")
    if mode in ("text_to_video", "image_to_video") and "num_frames" in values:
        updates[inputs[mode][-1]] = values["num_frames"]
    if mode in storyboards:  # the recorded segments, or an empty table for a single prompt
        updates[storyboards[mode]] = values.get("storyboard") or [[None, ""]]
    return updates

