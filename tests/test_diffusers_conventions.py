"""diffusers' conventions on the tiny checkpoint: batched frames, output types, the progress bar, num_inference_steps,
lists of prompts with num_videos_per_prompt, LoRAs from the hub and save_lora_weights, and the published
image-to-video guidance."""
import io
import json
import re

import numpy as np
import pytest
import torch
from diffusers.utils import export_to_video
from safetensors import safe_open

from model_core import PyramidFlowPipeline
from model_core.checkpoints import SETTINGS_FILE
from model_core.lora import DIFFUSERS_METADATA_KEY, DIFFUSERS_WEIGHTS
from model_core.media_files import read_video
from test_lora import trained_adapter
from tiny_checkpoint import build_tiny_checkpoint

FAST = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1))
CLIP = dict(num_frames=9, guidance_scale=1.0, video_guidance_scale=1.0, **FAST)


def transformer_calls(pipe):
    """A list that grows by one per transformer forward, and the hook to remove."""
    calls = []
    return calls, pipe.transformer.register_forward_hook(lambda *args: calls.append(1))


# --- frames and output types -------------------------------------------------------------------------------------

def test_frames_are_batched_and_export_to_video_writes_every_frame(pipe, tmp_path):
    out = pipe("a red circle", seed=3, **CLIP)
    assert out.frames.shape == (1, 9, 64, 64, 3) and out.frames.dtype == np.uint8
    assert out.latents.shape == (1, 4, 2, 8, 8)
    images = pipe("a red circle", seed=3, output_type="pil", **CLIP).frames
    assert len(images) == 1 and len(images[0]) == 9
    path = export_to_video(images[0], str(tmp_path / "clip.mp4"), fps=out.fps)  # diffusers' idiom
    written, _ = read_video(path)
    assert written.shape == (9, 64, 64, 3)
    colours = [video.reshape(9, -1, 3).mean(axis=1) for video in (written, out.frames[0])]  # per frame and channel
    assert np.abs(colours[0] - colours[1]).max() < 3  # the same pictures, through a lossy H.264


def test_output_types_hold_the_same_pixels(pipe, monkeypatch):
    frames = pipe("a blue square", seed=4, **CLIP).frames
    pt = pipe("a blue square", seed=4, output_type="pt", **CLIP).frames
    assert pt.shape == (1, 9, 3, 64, 64) and pt.dtype == torch.float32  # diffusers' [B, T, C, H, W] in [0, 1]
    assert 0 <= pt.min() and pt.max() <= 1
    torch.testing.assert_close(pt, torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255, rtol=0, atol=0)
    pil = pipe("a blue square", seed=4, output_type="pil", **CLIP).frames
    assert np.array_equal(np.stack([np.asarray(image) for image in pil[0]]), frames[0])

    def no_decode(*args):
        raise AssertionError("output_type='latent' decoded the latents")

    monkeypatch.setattr(pipe, "decode_latents", no_decode)
    latent = pipe("a blue square", seed=4, output_type="latent", **CLIP)
    assert latent.frames is latent.latents and latent.frames.shape == (1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="output_type must be one of 'np', 'pil', 'pt', 'latent'; got 'mp4'"):
        pipe("x", output_type="mp4", **CLIP)


# --- progress bar ------------------------------------------------------------------------------------------------

def bar_text(pipe, call) -> str:
    """What the pipeline's progress bar printed during `call()` (its config kept, its output captured)."""
    written = io.StringIO()
    pipe.set_progress_bar_config(file=written, ascii=True)
    try:
        call()
    finally:
        pipe.set_progress_bar_config()
    return written.getvalue()


def test_progress_bar_counts_every_step_and_can_be_disabled(pipe, checkpoint):
    steps = dict(first_frame_steps=(2, 1, 1), video_steps=(1, 2, 1), guidance_scale=1.0, video_guidance_scale=1.0)
    text = bar_text(pipe, lambda: pipe("x", num_frames=17, seed=0, **steps))
    assert re.findall(r"(\d+)/(\d+)", text)[-1] == ("12", "12")  # 4 steps for the first frame + 2 units x 4
    image = np.zeros((64, 64, 3), np.uint8)
    text = bar_text(pipe, lambda: pipe.image_to_video(image, "x", num_frames=17, seed=0, **steps))
    assert re.findall(r"(\d+)/(\d+)", text)[-1] == ("8", "8")  # the image is no generated unit
    written = io.StringIO()
    pipe.set_progress_bar_config(file=written, disable=True)
    try:
        pipe("x", seed=0, **CLIP)
    finally:
        pipe.set_progress_bar_config()
    assert written.getvalue() == ""


def test_the_cli_and_studio_pipelines_print_no_bar_of_their_own(checkpoint, capsys):
    from pyramid_app.cli import load_pipeline
    from pyramid_app.studio.sessions import PipelineCache
    from pyramid_app.options.settings import ModelOptions

    model = ModelOptions(model=str(checkpoint))
    for pipe in (load_pipeline(model), PipelineCache().get(model)):  # they report progress from their step callbacks
        capsys.readouterr()
        pipe("x", seed=0, **CLIP)
        assert not re.search(r"\d+/\d+ \[", capsys.readouterr().err)


# --- num_inference_steps -----------------------------------------------------------------------------------------

def test_num_inference_steps_sets_every_stage_of_every_unit(pipe):
    calls, hook = transformer_calls(pipe)
    try:
        out = pipe("x", num_frames=9, seed=0, guidance_scale=1.0, video_guidance_scale=1.0, num_inference_steps=2)
    finally:
        hook.remove()
    assert out.settings["first_frame_steps"] == out.settings["video_steps"] == [2, 2, 2]
    assert len(calls) == 2 * 3 * 2  # 2 units x 3 stages x 2 steps
    same = pipe("x", num_frames=9, seed=0, guidance_scale=1.0, video_guidance_scale=1.0,
                first_frame_steps=(2, 2, 2), video_steps=(2, 2, 2))
    assert np.array_equal(same.frames, out.frames)
    with pytest.raises(ValueError, match="give num_inference_steps or first_frame_steps / video_steps, not both"):
        pipe("x", num_inference_steps=2, video_steps=(1, 1, 1))
    for bad in (0, 2.5, True, "10"):
        with pytest.raises(ValueError, match="num_inference_steps must be a whole number of at least 1"):
            pipe("x", num_inference_steps=bad)


# --- lists of prompts, num_videos_per_prompt, generators -------------------------------------------------------

def test_list_of_prompts_with_num_videos_per_prompt_and_a_generator_per_video(pipe):
    prompts = ["a red circle", "a blue square"]
    generators = [torch.Generator().manual_seed(10 + i) for i in range(4)]
    out = pipe(prompts, num_videos_per_prompt=2, generator=generators, **CLIP)
    assert out.frames.shape == (4, 9, 64, 64, 3) and out.latents.shape == (4, 4, 2, 8, 8) and not out.interrupted
    for index, prompt in enumerate(["a red circle", "a red circle", "a blue square", "a blue square"]):
        alone = pipe(prompt, generator=torch.Generator().manual_seed(10 + index), **CLIP)
        assert np.array_equal(out.frames[index], alone.frames[0])
    assert out.settings["prompt"] == prompts and out.settings["num_videos_per_prompt"] == 2
    assert not np.array_equal(out.frames[0], out.frames[1])


def test_one_seed_is_one_generator_the_videos_draw_from_in_turn(pipe):
    out = pipe("a green triangle", num_videos_per_prompt=2, seed=5, **CLIP)
    generator = torch.Generator().manual_seed(5)
    first, second = (pipe("a green triangle", generator=generator, **CLIP).frames[0] for _ in range(2))
    assert np.array_equal(out.frames[0], first) and np.array_equal(out.frames[1], second)
    assert out.settings["seed"] == 5 and out.settings["prompt"] == "a green triangle"
    pt = pipe(["a", "b"], seed=5, output_type="pt", **CLIP).frames
    assert pt.shape == (2, 9, 3, 64, 64)
    pil = pipe(["a", "b"], seed=5, output_type="pil", **CLIP).frames
    assert [len(video) for video in pil] == [9, 9]


def test_a_stop_ends_the_batch_and_keeps_what_was_made(pipe):
    def stop_in_the_second_video(pipe, step_index, timestep, callback_kwargs):
        stop_in_the_second_video.units += pipe.progress.kind == "unit"
        pipe._interrupt = stop_in_the_second_video.units == 3  # the first unit of video 2
        return {}

    stop_in_the_second_video.units = 0
    out = pipe(["a", "b", "c"], seed=1, callback_on_step_end=stop_in_the_second_video, **CLIP)
    assert out.interrupted and out.settings["interrupted"]
    assert isinstance(out.frames, list) and [video.shape[0] for video in out.frames] == [9, 1]  # lengths differ
    assert [latents.shape[1] for latents in out.latents] == [2, 1]


def test_batch_options_are_checked_before_anything_runs(pipe):
    calls, hook = transformer_calls(pipe)
    try:
        with pytest.raises(ValueError, match="the prompt is empty"):
            pipe(["a red circle", " "], **CLIP)
        with pytest.raises(ValueError, match=r"a generator list needs one torch.Generator per video \(4\); got 3"):
            pipe(["a", "b"], num_videos_per_prompt=2, generator=[torch.Generator()] * 3, **CLIP)
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match="num_videos_per_prompt must be a whole number of at least 1"):
                pipe("a", num_videos_per_prompt=bad, **CLIP)
        embeds, _ = pipe.encode_prompt("a", do_classifier_free_guidance=False)
        with pytest.raises(ValueError, match="give a list of prompts or prompt_embeds, not both"):
            pipe(["a", "b"], prompt_embeds=embeds, **CLIP)
        with pytest.raises(ValueError, match="stream_to writes the uint8 frames of one video"):
            pipe(["a", "b"], stream_to=object(), **CLIP)
    finally:
        hook.remove()
    assert calls == []


# --- LoRA: hub ids, weight_name, save_lora_weights ---------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_folder(pipe, tmp_path_factory):
    """What training writes for a LoRA of the tiny transformer (non-zero B matrices)."""
    model = type(pipe.transformer).from_config(pipe.transformer.config)
    model.load_state_dict(pipe.transformer.state_dict())
    return trained_adapter(tmp_path_factory.mktemp("lora") / "style", 1, model=model)[0]


def latents_of(pipe):
    return pipe("a red square", seed=0, output_type="latent", **CLIP).latents


def test_training_writes_diffusers_pipeline_file(lora_folder):
    assert sorted(path.name for path in lora_folder.iterdir()) == [DIFFUSERS_WEIGHTS]
    with safe_open(str(lora_folder / DIFFUSERS_WEIGHTS), "pt") as handle:
        assert all(key.startswith("transformer.") for key in handle.keys())
        config = json.loads(handle.metadata()[DIFFUSERS_METADATA_KEY])
    assert config["transformer.r"] == 4 and config["transformer.lora_alpha"] == 8


def test_hub_ids_and_weight_name(pipe, lora_folder, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    base = latents_of(pipe)
    pipe.load_lora_weights(lora_folder)
    styled = latents_of(pipe)
    pipe.unload_lora_weights()
    assert not torch.allclose(base, styled, atol=1e-4)

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "style_v2.safetensors").write_bytes((lora_folder / DIFFUSERS_WEIGHTS).read_bytes())
    fetched = []

    def hf_hub_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        if filename == "missing.safetensors":
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(renamed / filename) if filename != DIFFUSERS_WEIGHTS else str(lora_folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert pipe.load_lora_weights("someone/tiny-style", weight_name="style_v2.safetensors") == "tiny-style"
    assert torch.equal(latents_of(pipe), styled) and pipe.lora_settings() == [{"name": "tiny-style", "weight": 1.0}]
    pipe.unload_lora_weights()
    pipe.load_lora_weights("someone/tiny-style", adapter_name="default-file")  # pytorch_lora_weights.safetensors
    pipe.unload_lora_weights()
    assert fetched == [("someone/tiny-style", "style_v2.safetensors"), ("someone/tiny-style", DIFFUSERS_WEIGHTS)]
    pipe.load_lora_weights(renamed, weight_name="style_v2.safetensors")  # a local folder takes weight_name too
    assert torch.equal(latents_of(pipe), styled) and pipe.get_active_adapters() == ["renamed"]
    pipe.unload_lora_weights()

    with pytest.raises(FileNotFoundError, match="has no file missing.safetensors; name its LoRA file with weight_name="):
        pipe.load_lora_weights("someone/tiny-style", weight_name="missing.safetensors")
    with pytest.raises(FileNotFoundError, match="holds no file other.safetensors"):
        pipe.load_lora_weights(renamed, weight_name="other.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist; give a folder, a .safetensors file or a hub repo id"):
        pipe.load_lora_weights(tmp_path / "nowhere" / "at-all")

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConnectionError, match="the Hugging Face Hub is not reachable"):
        pipe.load_lora_weights("someone/tiny-style")
    assert pipe.lora_settings() == [] and torch.equal(latents_of(pipe), base)


def test_save_lora_weights_round_trips_and_diffusers_reads_it(checkpoint, lora_folder, tmp_path):
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint)
    pipe.load_lora_weights(lora_folder, adapter_name="style", weight=0.5)
    styled = latents_of(pipe)
    path = pipe.save_lora_weights(tmp_path / "saved")
    assert path == tmp_path / "saved" / DIFFUSERS_WEIGHTS
    assert sorted(p.name for p in path.parent.iterdir()) == [DIFFUSERS_WEIGHTS]  # no staging file left
    fresh = PyramidFlowPipeline.from_pretrained(checkpoint)
    fresh.load_lora_weights(path.parent, weight=0.5)
    assert torch.equal(latents_of(fresh), styled)
    fresh.unload_lora_weights()
    fresh.transformer.load_lora_adapter(str(path.parent), weight_name=DIFFUSERS_WEIGHTS, prefix="transformer",
                                        adapter_name="by-diffusers")  # diffusers' own loader, config from the metadata
    fresh.transformer.set_adapters(["by-diffusers"], [0.5])
    assert torch.equal(latents_of(fresh), styled)

    pipe.load_lora_weights(lora_folder, adapter_name="second")
    with pytest.raises(ValueError, match="2 LoRAs are loaded; name the one to save with adapter_name="):
        pipe.save_lora_weights(tmp_path / "two")
    assert pipe.save_lora_weights(tmp_path / "named", adapter_name="second", weight_name="second.safetensors").is_file()
    with pytest.raises(ValueError, match="no LoRA named 'third' is loaded"):
        pipe.save_lora_weights(tmp_path / "three", adapter_name="third")


# --- the published image-to-video guidance -----------------------------------------------------------------------

def test_image_to_video_uses_the_published_video_guidance(tmp_path):
    image = np.full((64, 64, 3), 90, np.uint8)
    clip = dict(num_frames=9, height=64, width=64, seed=2, **FAST)
    published = build_tiny_checkpoint(tmp_path / "published")
    (published / SETTINGS_FILE).unlink()  # the published repos carry no pyramid_flow.json
    pipe = PyramidFlowPipeline.from_pretrained(published, variant="384p")
    out = pipe.image_to_video(image, "it moves", output_type="latent", **clip)
    assert (out.settings["guidance_scale"], out.settings["video_guidance_scale"]) == (7.0, 4.0)  # the authors' i2v
    assert torch.equal(out.latents, pipe.image_to_video(image, "it moves", output_type="latent",
                                                        video_guidance_scale=4.0, **clip).latents)
    assert pipe.text_to_video("it moves", output_type="latent", **clip).settings["video_guidance_scale"] == 5.0
    given = pipe.image_to_video(image, "it moves", output_type="latent", video_guidance_scale=6.0, **clip)
    assert given.settings["video_guidance_scale"] == 6.0
    pipe.save_pretrained(tmp_path / "saved")
    saved = PyramidFlowPipeline.from_pretrained(tmp_path / "saved")
    assert saved.image_to_video(image, "it moves", output_type="latent", **clip).settings["video_guidance_scale"] == 4.0


def test_a_checkpoint_with_its_own_sampling_keeps_its_video_guidance(tmp_path):
    image = np.full((64, 64, 3), 90, np.uint8)
    own = build_tiny_checkpoint(tmp_path / "own")
    settings = json.loads((own / SETTINGS_FILE).read_text())
    settings["sampling"] = {"video_guidance_scale": 1.5}
    (own / SETTINGS_FILE).write_text(json.dumps(settings))
    pipe = PyramidFlowPipeline.from_pretrained(own)
    out = pipe.image_to_video(image, "it moves", num_frames=9, seed=2, output_type="latent", **FAST)
    assert out.settings["video_guidance_scale"] == 1.5
    pipe.save_pretrained(tmp_path / "saved")  # model_index.json records no image-to-video value for it
    assert "image_to_video_guidance_scale" not in json.loads((tmp_path / "saved" / "model_index.json").read_text())[
        "pyramid_flow"]["sampling"]
    settings["sampling"]["image_to_video_guidance_scale"] = 2.5
    (own / SETTINGS_FILE).write_text(json.dumps(settings))
    named = PyramidFlowPipeline.from_pretrained(own)
    assert named.image_to_video(image, "it moves", num_frames=9, seed=2, output_type="latent",
                                **FAST).settings["video_guidance_scale"] == 2.5
