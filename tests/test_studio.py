"""The studio without a browser: layout, flags, and every named endpoint through gradio_client on a tiny checkpoint."""
import asyncio
import functools
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import gradio

from benchmarks import hosted_probes
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from model_core.checkpoints import SETTINGS_FILE
from model_core.media_files import read_metadata, read_video, write_video
from pyramid_app.options import catalog
from pyramid_app.studio import gallery, serve, layout as studio
from pyramid_app.studio.sessions import PipelineCache
from pyramid_app.options.settings import ModelOptions, memory_choices
from tiny_checkpoint import build_tiny_checkpoint

FAST = dict(guidance_scale=1, video_guidance_scale=1, first_frame_steps_stage_1=1, first_frame_steps_stage_2=1,
            first_frame_steps_stage_3=1, video_steps_stage_1=1, video_steps_stage_2=1, video_steps_stage_3=1)
ENDPOINTS = ("/text_to_video", "/image_to_video", "/extend_video", "/text_to_image")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slowed_pipelines(model: Path, seconds_per_step: float) -> PipelineCache:
    """A cache holding the studio's default pipeline for `model`, its transformer slowed so Stop can land mid-run."""
    pipelines = PipelineCache()
    pipe = pipelines.get(ModelOptions(model=str(model)))
    pipe.transformer.register_forward_pre_hook(lambda module, args: time.sleep(seconds_per_step))
    return pipelines


def launch_studio(model: Path, output_dir: Path, pipelines=None):
    """Serve the studio on 127.0.0.1 and a free port in this process; returns (demo, url)."""
    flags = serve.parse_flags(["--port", str(free_port()), "--output-dir", str(output_dir), "--no-browser"])
    demo = studio.build_studio(default_model=model, output_dir=output_dir, pipelines=pipelines)
    _, url, _ = serve.launch(demo, flags, block=False)
    return demo, url


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "miniflux")


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("outputs")
    demo, url = launch_studio(tiny_model, output_dir, slowed_pipelines(tiny_model, 0.01))
    yield url, output_dir
    demo.close()


@pytest.fixture
def client(served):
    return Client(served[0], verbose=False, download_files=False)


def smooth_clip(frames=9, size=64) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(frames), np.arange(size), np.arange(size), indexing="ij")
    return np.clip(np.stack([2 * x + 4 * t, 3 * y, 255 - 2 * x - y], axis=-1), 0, 255).astype(np.uint8)


def collect(updates) -> list:
    """Every update an async handler yields, run to the end."""
    async def run():
        return [update async for update in updates]

    return asyncio.run(run())


def local_path(file) -> Path:
    return Path(file["path"] if isinstance(file, dict) else file)


# --- flags and layout ----------------------------------------------------------------------------


def test_flags_are_safe_by_default(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    flags = serve.parse_flags([])
    assert (flags.host, flags.port, flags.share) == ("127.0.0.1", serve.DEFAULT_PORT, False)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert serve.parse_flags([]).port == 7999
    assert serve.parse_flags(["--port", "8001", "--share"]).port == 8001


def test_studio_starts_without_the_bundled_model_and_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setitem(catalog.BUNDLED_MODELS, catalog.BUNDLED, tmp_path / "missing")
    demo = studio.build_studio(output_dir=tmp_path)
    notes = [block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model-note"]
    assert notes and "not installed" in notes[0] and "rain1011/pyramid-flow-miniflux" in notes[0]


def test_memory_panel_offers_only_what_works_on_cpu():
    import torch

    choices = memory_choices(torch.device("cpu"))
    assert choices["offload"] == ("none",)
    assert "nf4" not in choices["quantize"] and "int8" in choices["quantize"]
    assert "float16" not in choices["dtype"]


def test_model_menu_knows_limits_without_loading(tiny_model):
    facts = catalog.model_facts(str(tiny_model))
    assert facts.variants == ("384p",) and facts.spec("auto").max_frames == 17
    assert catalog.length_limits(facts.spec("auto")) == (9, 17, 8)
    assert catalog.length_limits(facts.spec("auto"), extension=True) == (8, 16, 8)
    assert catalog.model_facts("rain1011/pyramid-flow-sd3").spec("768p").max_frames == 241
    assert "No checkpoint folder" in catalog.model_facts("/no/such/folder").note


def test_the_length_sliders_follow_the_vaes_temporal_compression(tmp_path):
    spec = catalog.model_facts(str(build_tiny_checkpoint(tmp_path, frames_per_latent=4))).spec("auto")
    assert spec.max_frames == 9
    assert catalog.length_limits(spec) == (5, 9, 4) and catalog.length_limits(spec, extension=True) == (4, 8, 4)


# --- the named endpoints -------------------------------------------------------------------------


def test_api_lists_the_four_endpoints_with_the_prompt_first(client):
    api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(ENDPOINTS) <= set(api)
    first = {name: [p["parameter_name"] for p in api[name]["parameters"]][:2] for name in ENDPOINTS}
    assert first == {"/text_to_video": ["prompt", "num_frames"], "/image_to_video": ["image", "prompt"],
                     "/extend_video": ["video", "prompt"], "/text_to_image": ["prompt", "model"]}
    required = {name: [p["parameter_name"] for p in api[name]["parameters"] if not p["parameter_has_default"]]
                for name in ENDPOINTS}
    assert required == {"/text_to_video": ["prompt"], "/image_to_video": ["image"], "/extend_video": ["video"],
                        "/text_to_image": ["prompt"]}


def test_text_to_video_saves_an_mp4_with_its_settings(client, served):
    video, frames, status, seed = client.predict("a red ball", seed="123", **FAST, api_name="/text_to_video")
    path = local_path(video)
    assert path.suffix == ".mp4" and (served[1] / path.name).is_file()
    settings = read_metadata(path)
    assert settings["prompt"] == "a red ball" and settings["seed"] == 123 == int(seed)
    assert len(frames) == settings["num_frames"] == 17
    assert "Saved" in status


def test_image_to_video_animates_an_upload(client, tmp_path):
    image = tmp_path / "still.png"
    Image.fromarray(smooth_clip(1)[0]).save(image)
    video, frames, _, _ = client.predict(handle_file(str(image)), "it drifts", num_frames=9, **FAST,
                                         api_name="/image_to_video")
    assert read_metadata(local_path(video))["mode"] == "image_to_video"
    assert read_video(local_path(video))[0].shape[0] == 9


def test_extend_video_continues_an_upload(client, tmp_path):
    clip = write_video(smooth_clip(9), tmp_path / "clip.mp4", 8, {})
    video, _, _, _ = client.predict(handle_file(str(clip)), "", **FAST, api_name="/extend_video")
    assert read_video(local_path(video))[0].shape[0] == 9 + 8


def test_text_to_image_saves_a_png(client):
    image, frames, status, _ = client.predict("a blue square", **FAST, api_name="/text_to_image")
    assert local_path(image).suffix == ".png" and len(frames) == 1 and "1 image" in status
    assert read_metadata(local_path(image))["mode"] == "text_to_image"


def test_stop_keeps_the_partial_video(client):
    job = client.submit("a slow ball", seed="7", api_name="/text_to_video")
    deadline = time.monotonic() + 60
    while not hosted_probes.frames_streamed(job) and time.monotonic() < deadline:  # the first unit has streamed in
        time.sleep(0.05)
    assert client.predict(api_name="/stop").startswith("Stopping")
    video, frames, status, _ = job.result(timeout=60)
    settings = read_metadata(local_path(video))
    assert settings["interrupted"] and settings["num_frames"] < 17
    assert status.startswith("Stopped") and len(frames) == settings["num_frames"]


# --- readable errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint, arguments, message", [
    ("/image_to_video", (None, "x"), "Upload an image to animate first."),
    ("/extend_video", (None, "x"), "Upload a video clip to extend first."),
    ("/text_to_video", ("x", 25), "num_frames must be one of 9, 17 for this model; got 25"),
    ("/text_to_video", ("",), "The prompt is empty"),
])
def test_bad_inputs_give_a_readable_message(client, endpoint, arguments, message):
    with pytest.raises(AppError) as error:
        client.predict(*arguments, **FAST, api_name=endpoint)
    assert message in str(error.value) and "Traceback" not in str(error.value)


def test_an_error_replaces_ready_in_the_status_line(client):
    job = client.submit("x", 25, **FAST, api_name="/text_to_video")
    with pytest.raises(AppError, match="num_frames must be one of 9, 17"):
        job.result(timeout=60)
    statuses = [outputs[2] for outputs in job.outputs()]
    assert statuses == ["Not done: num_frames must be one of 9, 17 for this model; got 25"]


@pytest.mark.parametrize("control, value", [("first_frame_steps_stage_1", -5), ("video_steps_stage_3", 51),
                                            ("guidance_scale", 20), ("cache_threshold", 2), ("seed", "2" * 20)])
def test_the_ui_notes_refuse_a_number_with_the_apis_sentence(client, control, value):
    from pyramid_app.studio.endpoints import NUMBER_CHECKS, refusal

    with pytest.raises(AppError) as error:
        client.predict("x", **{**FAST, control: value}, api_name="/text_to_video")
    note = refusal(NUMBER_CHECKS[control], value)
    assert note and note in str(error.value)


def test_the_length_note_says_what_the_api_would_and_follows_the_storyboard(tiny_model):
    spec = catalog.model_facts(str(tiny_model)).spec("auto")
    assert studio._length_note(spec, 17) == "17 frames ≈ 2.1 s at 8 fps"
    assert studio._length_note(spec, 100000) == "⚠️ num_frames must be one of 9, 17 for this model; got 100000"
    assert studio._length_note(spec, 24, extension=True) == "⚠️ New frames must be one of 8, 16 for this model; got 24"
    table = {"headers": ["seconds", "prompt"], "data": [[1, "a red ball"], [1, "a blue cube"], [None, ""]]}
    assert studio._length_note(spec, 100000, table, long_video=True) == (
        "Storyboard: 2 segments, 2 s → 17 frames ≈ 2.1 s at 8 fps (the storyboard sets the length)")
    long = {"headers": ["seconds", "prompt"], "data": [[30, "a red ball"]]}
    assert studio._length_note(spec, 17, long, long_video=True).startswith(
        "⚠️ The storyboard lasts 30 s (241 frames); this model makes at most 161 frames")
    assert studio._length_note(spec, 17, [[1, "a"], ["soon", "b"]]) == (
        "⚠️ Storyboard row 2 needs its seconds as a number and a prompt")


def test_no_control_clamps_a_typed_number(tiny_model, tmp_path):
    """Gradio's sliders snap a typed value into their range when the field loses focus; the studio has none."""
    from pyramid_app.studio.endpoints import NUMBER_CHECKS

    demo = studio.build_studio(default_model=str(tiny_model), output_dir=tmp_path / "outputs")
    assert not [block for block in demo.blocks.values() if isinstance(block, gradio.Slider)]
    numbers = {block.elem_id for block in demo.blocks.values() if isinstance(block, gradio.Number)}
    assert {name.replace("_", "-") for name in NUMBER_CHECKS if name != "seed"} <= numbers  # the seed: digits as text
    assert {"t2v-frames", "i2v-frames", "extend-frames"} <= numbers


def test_bundled_prompt_words_are_the_shapes_worlds():
    from pyramid_app.studio import bundled_prompts
    from training import shapes_world

    assert (bundled_prompts.COLOURS, bundled_prompts.SHAPES, bundled_prompts.DIRECTIONS) == (
        tuple(shapes_world.PALETTE), shapes_world.SHAPES, tuple(shapes_world.DIRECTIONS))
    assert not [prompt for prompt in shapes_world.PROMPTS if bundled_prompts.unseen_words(prompt)]
    assert set(bundled_prompts.EXAMPLE_PROMPTS) <= set(shapes_world.PROMPTS)
    assert bundled_prompts.unseen_words("A Blue circle moving right, on a blue background!") == ["on", "background"]
    assert bundled_prompts.unseen_words_note("a blue circle moving right") == ""
    assert "“background”" in bundled_prompts.unseen_words_note("a blue circle on a background")


def test_corrupt_video_gives_a_readable_message(client, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 100)
    with pytest.raises(AppError, match="Cannot read video broken.mp4"):
        client.predict(handle_file(str(broken)), "x", **FAST, api_name="/extend_video")


def test_bad_seed_and_missing_model_give_readable_messages(client, tmp_path):
    with pytest.raises(AppError, match="The seed must be a whole number"):
        client.predict("x", seed="abc", **FAST, api_name="/text_to_image")
    with pytest.raises(AppError, match="No checkpoint folder at"):
        client.predict("x", model=str(tmp_path / "nothing"), **FAST, api_name="/text_to_image")


def test_only_the_output_folder_is_served(client, served):
    video, *_ = client.predict("a ball", **FAST, api_name="/text_to_image")
    base = served[0].rstrip("/") + "/gradio_api/file="
    with urllib.request.urlopen(base + str(local_path(video))) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(base + str(Path(serve.__file__).resolve()))
    assert denied.value.code == 403


# --- gallery and reuse ---------------------------------------------------------------------------


def test_reuse_reads_every_control_from_an_outputs_metadata(client):
    video, *_ = client.predict("a green triangle", negative_prompt="blur", seed="42", num_frames=9, **FAST,
                               api_name="/text_to_video")
    values = gallery.control_values(gallery.saved_settings(local_path(video)))
    assert values["prompt"] == "a green triangle" and values["negative_prompt"] == "blur"
    assert values["seed"] == "42" and values["num_frames"] == 9 and values["guidance_scale"] == 1
    assert values["first_frame_steps_stage_2"] == 1 and values["video_steps_stage_3"] == 1
    assert values["dtype"] == "float32" and values["offload"] == "none"


def test_gallery_captions_say_what_each_output_is():
    history = gallery.add([], "/out/a.mp4", {"mode": "text_to_video", "num_frames": 17, "seed": 5, "prompt": "a ball"})
    history = gallery.add(history, "/out/b.png", {"mode": "text_to_image", "num_frames": 1, "seed": 6,
                                                  "interrupted": False, "prompt": "x" * 100})
    items = gallery.gallery_items(history)
    assert items[0][0] == "/out/b.png" and items[0][1].startswith("Text → Image · seed 6 — xxx")
    assert items[1] == ("/out/a.mp4", "Text → Video · 17 frames · seed 5 — a ball")


def test_settings_without_a_mode_are_refused(tmp_path):
    clip = write_video(smooth_clip(1), tmp_path / "other.mp4", 8, {"note": "not ours"})
    with pytest.raises(ValueError, match="not from a Pyramid Flow generation"):
        gallery.saved_settings(clip)


def test_generating_with_the_missing_bundled_model_says_what_to_pick(monkeypatch, tmp_path):
    from pyramid_app.studio.endpoints import Endpoints

    monkeypatch.setitem(catalog.BUNDLED_MODELS, catalog.BUNDLED, tmp_path / "missing")
    updates = []

    async def generate():
        async for update in Endpoints(output_dir=tmp_path).text_to_image("a ball", [], model=catalog.BUNDLED):
            updates.append(update)

    with pytest.raises(gradio.Error, match="bundled model is not installed"):
        asyncio.run(generate())
    assert "bundled model is not installed" in updates[-1][2]  # the status line says it before the message pops up


def test_sampling_panel_starts_at_the_models_defaults_and_follows_the_menu(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "own-defaults")
    settings = json.loads((root / SETTINGS_FILE).read_text())
    settings["sampling"] = {"first_frame_steps": [3, 4, 5], "guidance_scale": 2.5, "video_guidance_scale": 1.5}
    (root / SETTINGS_FILE).write_text(json.dumps(settings))
    demo = studio.build_studio(default_model=str(root), output_dir=tmp_path / "outputs")
    numbers = [(block.label, block.value) for block in demo.blocks.values() if isinstance(block, gradio.Number)]
    assert ("Guidance, first frame (0 to 15)", 2.5) in numbers and ("Video guidance, later frames (0 to 15)", 1.5) in numbers
    assert [value for label, value in numbers if label.startswith("stage ")] == [3, 4, 5, 10, 10, 10]
    assert studio.model_sampling(catalog.model_facts(str(root))) == [2.5, 1.5, 3, 4, 5, 10, 10, 10, 1.5]
    published = catalog.model_facts("rain1011/pyramid-flow-miniflux")
    assert studio.model_sampling(published) == [7.0, 5.0, 20, 20, 20, 10, 10, 10, 4.0]  # image to video: 4


def test_image_to_video_starts_at_the_models_image_guidance(tmp_path):
    """The published checkpoints animate an image at video guidance 4 (the authors' default) and make text-to-video at
    5: the image tab's endpoints default to the first, the others to the second."""
    root = build_tiny_checkpoint(tmp_path / "published-defaults")
    settings = json.loads((root / SETTINGS_FILE).read_text())
    settings["sampling"] = {"video_guidance_scale": 5.0, "image_to_video_guidance_scale": 4.0}
    (root / SETTINGS_FILE).write_text(json.dumps(settings))
    api = studio.build_studio(default_model=str(root), output_dir=tmp_path / "outputs").get_api_info()["named_endpoints"]

    def default(endpoint):
        return next(p["parameter_default"] for p in api[endpoint]["parameters"]
                    if p["parameter_name"] == "video_guidance_scale")

    assert [default(f"/{mode}") for mode in ("image_to_video", "queue_image_to_video")] == [4.0, 4.0]
    assert [default(f"/{mode}") for mode in ("text_to_video", "extend_video", "queue_text_to_video")] == [5.0] * 3


def test_progress_updates_are_spaced_out(tiny_model, tmp_path):
    """Every step event reaching the browser costs it a render on the cores the model uses: the handler
    passes at most one per PROGRESS_INTERVAL on (the first step's always)."""
    from pyramid_app.studio.endpoints import PROGRESS_INTERVAL, Endpoints

    controls = dict(model=str(tiny_model), variant="auto", dtype="float32", offload="none", quantize="none",
                    vae_tiling=False, negative_prompt="", seed="3", guidance_scale=1, video_guidance_scale=1,
                    **{gallery.step_control(name, stage): 8 for name in ("first_frame_steps", "video_steps")
                       for stage in range(3)})
    shown = []
    started = time.monotonic()
    outputs = collect(Endpoints(tiny_model, tmp_path).text_to_video(
        "a ball", 17, [], progress=lambda fraction, desc="": shown.append((time.monotonic(), desc)), **controls))
    elapsed = time.monotonic() - started
    steps = [desc for _, desc in shown if "step" in desc]
    assert Path(outputs[-1][0]).is_file()
    assert steps[0].endswith("step 1/8") and len(steps) <= elapsed / PROGRESS_INTERVAL + 1
    assert len(steps) < 3 * 3 * 8  # three units of three stages of 8 steps each
    times = [when for when, desc in shown if "step" in desc]
    assert all(later - earlier >= PROGRESS_INTERVAL * 0.99 for earlier, later in zip(times, times[1:]))


def test_speed_panel_offers_what_works_here_and_records_it(client, tiny_model, tmp_path):
    from model_core.speed import speed_choices
    from model_core.transformers.attention_backends import usable_attention_backends

    demo = studio.build_studio(default_model=str(tiny_model), output_dir=tmp_path / "outputs")
    radios = {block.label: [choice[1] for choice in block.choices] for block in demo.blocks.values()
              if isinstance(block, gradio.Radio)}
    assert radios["Attention backend"] == usable_attention_backends(torch.device("cpu"))
    assert radios["Step cache"] == list(speed_choices(torch.device("cpu"))["cache"])
    compile_info = next(block.info for block in demo.blocks.values() if getattr(block, "label", None) == "Compile")
    assert "on a CPU each new shape takes tens of seconds to compile" in compile_info  # says what "on" costs here
    video, *_ = client.predict("a red ball", seed="3", cache="first-block", cache_threshold=0.2, **FAST,
                               api_name="/text_to_video")
    settings = read_metadata(local_path(video))
    assert (settings["cache"], settings["cache_threshold"], settings["attention_backend"]) == ("first-block", 0.2, "native")
    reused = gallery.control_values(settings)
    assert (reused["cache"], reused["cache_threshold"], reused["compile"]) == ("first-block", 0.2, "off")
    with pytest.raises(AppError, match="[Cc]ache must be one of none, first-block"):
        client.predict("a red ball", cache="tea", **FAST, api_name="/text_to_video")


def test_reusing_an_animated_image_fills_the_image_guidance_not_the_text_one():
    image_guidance, video_guidance = gradio.Number(), gradio.Number()
    controls = {"video_guidance_scale": video_guidance, "model": gradio.Dropdown(), "variant": gradio.Dropdown()}
    inputs = {"image_to_video": [gradio.Image(), gradio.Textbox(), gradio.Number()]}
    tab_controls = functools.partial(studio._tab_controls, controls, {}, image_guidance)
    settings = {"mode": "image_to_video", "video_guidance_scale": 3.5, "prompt": "it drifts", "num_frames": 9}
    updates = studio._reuse_updates(settings, catalog.ModelMenu([]), gradio.Tabs(), inputs, tab_controls,
                                    gradio.Markdown(), {})
    assert updates[image_guidance]["value"] == 3.5 and video_guidance not in updates


def test_the_few_step_bundled_model_is_offered_by_name_with_its_own_schedule(monkeypatch, tmp_path):
    """The turbo (issue 33) is a menu entry of its own, also in hosted mode; its step controls show its schedule and
    outputs name it "bundled-turbo" (not the server's folder), which Reuse maps back to the entry."""
    turbo = build_tiny_checkpoint(tmp_path / "turbo")
    settings = json.loads((turbo / SETTINGS_FILE).read_text())
    settings["sampling"] = {"first_frame_steps": [1, 1, 2], "video_steps": [1, 1, 2], "guidance_scale": 1.0,
                            "video_guidance_scale": 1.0, "stage_grid": "trailing"}
    (turbo / SETTINGS_FILE).write_text(json.dumps(settings))
    monkeypatch.setitem(catalog.BUNDLED_MODELS, catalog.BUNDLED_TURBO, turbo)
    for hosted in (False, True):
        menu = catalog.ModelMenu([], hosted=hosted)
        assert ("turbo (bundled, few-step: fast)", "bundled-turbo") in menu.choices()
        assert menu.source_for("bundled-turbo") == "bundled-turbo" and menu.is_local("bundled-turbo")
    assert studio.model_sampling(catalog.model_facts("bundled-turbo")) == [1.0, 1.0, 1, 1, 2, 1, 1, 2, 1.0]
    assert catalog.choice_for(str(turbo)) == "bundled-turbo" and catalog.choice_for("bundled-turbo") == "bundled-turbo"
    from pyramid_app.options.settings import model_name, model_source

    assert (model_name("bundled-turbo"), model_source("bundled-turbo")) == ("bundled-turbo", str(turbo))
    monkeypatch.setitem(catalog.BUNDLED_MODELS, catalog.BUNDLED_TURBO, tmp_path / "absent")
    assert "bundled-turbo" not in [value for _, value in catalog.ModelMenu([], hosted=True).choices()]
    with pytest.raises(FileNotFoundError, match="no bundled-turbo model is installed"):
        model_source("bundled-turbo")
