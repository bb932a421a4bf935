"""The generation engine on tiny official-layout checkpoints: every mode, progress, stop, errors, memory options."""
import json
import threading

import numpy as np
import pytest
import torch

from model_core import PyramidFlowPipeline
from model_core.checkpoints import SETTINGS_FILE
from model_core.temporal import frames_for_duration
from tiny_checkpoint import build_tiny_checkpoint

FAST = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1))


@pytest.fixture(scope="module")
def image():
    y, x = np.mgrid[0:80, 0:96]
    return np.stack([(x * 2) % 256, (y * 3) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)


def test_text_to_video_shapes_and_settings(pipe):
    out = pipe.text_to_video("a red circle moving left", num_frames=17, seed=1, **FAST)
    assert out.frames[0].shape == (17, 64, 64, 3) and out.frames[0].dtype == np.uint8
    assert out.fps == 8 and not out.interrupted
    assert out.latents.shape == (1, 4, 3, 8, 8)
    assert out.settings["seed"] == 1 and out.settings["mode"] == "text_to_video"
    assert out.settings["first_frame_steps"] == [1, 1, 1] and out.settings["num_frames"] == 17
    assert np.abs(np.diff(out.frames[0].astype(int), axis=0)).mean() > 0  # frames are not all the same


def test_default_length_is_the_checkpoint_maximum(pipe):
    assert pipe.text_to_video("x", seed=0, **FAST).frames[0].shape[0] == pipe.spec.max_frames == 17


def test_same_seed_same_frames_and_other_seed_differs(pipe):
    a = pipe.text_to_video("a blue square", num_frames=9, seed=7, **FAST)
    b = pipe.text_to_video("a blue square", num_frames=9, seed=7, **FAST)
    c = pipe.text_to_video("a blue square", num_frames=9, seed=8, **FAST)
    assert np.array_equal(a.frames[0], b.frames[0])
    assert not np.array_equal(a.frames[0], c.frames[0])


def test_generator_is_used_instead_of_global_rng(pipe):
    torch.manual_seed(0)
    a = pipe.text_to_image("x", generator=torch.Generator().manual_seed(3), **FAST)
    torch.manual_seed(1)
    b = pipe.text_to_image("x", generator=torch.Generator().manual_seed(3), **FAST)
    assert np.array_equal(a.frames[0], b.frames[0])


def test_text_to_image_is_one_unit(pipe):
    out = pipe.text_to_image("a yellow triangle", seed=2, **FAST)
    assert out.frames[0].shape == (1, 64, 64, 3) and out.latents.shape[2] == 1
    with pytest.raises(ValueError, match="one frame"):
        pipe.text_to_image("x", num_frames=9)


def test_image_to_video_starts_from_the_image(pipe, image):
    out = pipe.image_to_video(image, "it moves right", num_frames=9, seed=3, **FAST)
    assert out.frames[0].shape == (9, 64, 64, 3)
    from model_core.media import as_frames, to_video_tensor

    expected = pipe.decode_latents(pipe.encode_video(to_video_tensor(as_frames(image, "image"), 64, 64)))
    assert np.array_equal(out.frames[0][0], expected[0])
    assert out.latents.shape[2] == 2


def test_extend_video_keeps_the_input_and_appends(pipe):
    clip = pipe.text_to_video("a cyan circle", num_frames=9, seed=4, **FAST).frames[0]
    out = pipe.extend_video(clip, "it keeps moving", num_frames=8, seed=5, **FAST)
    assert out.frames[0].shape == (17, 64, 64, 3)
    assert np.array_equal(out.frames[0][:9], clip)
    assert out.latents.shape[2] == 3


def test_extend_uses_only_what_fits_the_model(pipe):
    clip = pipe.text_to_video("a cyan circle", num_frames=17, seed=4, **FAST).frames[0]
    out = pipe.extend_video(clip, "more", num_frames=8, seed=5, **FAST)
    assert out.frames[0].shape[0] == 25  # whole input kept, history trimmed to the 2 latent frames that fit
    assert out.latents.shape[2] == 3


def recorder(events, tensors=()):
    """A callback_on_step_end that keeps (progress, step_index, the requested tensors) of every step."""
    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        events.append((pipe.progress, step_index, callback_kwargs))
        return {}

    return on_step_end


def test_progress_and_unit_previews_through_callback_on_step_end(pipe):
    events = []
    pipe.text_to_video("x", num_frames=17, seed=0, first_frame_steps=(2, 1, 1), video_steps=(1, 2, 1),
                       callback_on_step_end=recorder(events), callback_on_step_end_tensor_inputs=["video_latents"])
    progress = [e[0] for e in events]
    assert [e[1] for e in events] == list(range(4 + 2 * 4))  # one call per transformer step, counted over the video
    units = [p for p in progress if p.kind == "unit"]
    assert [(p.unit, p.num_units) for p in units] == [(0, 3), (1, 3), (2, 3)]
    previews = [pipe.unit_preview(kw["video_latents"]) for p, _, kw in events if p.kind == "unit"]
    assert [frames.shape for frames in previews] == [(1, 64, 64, 3), (8, 64, 64, 3), (8, 64, 64, 3)]
    assert all(kw["video_latents"] is None for p, _, kw in events if p.kind == "step")
    fractions = [p.fraction for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert progress[0].fraction == pytest.approx(1 / 4 / 3) and units[0].fraction == pytest.approx(1 / 3)
    full = pipe.text_to_video("x", num_frames=17, seed=0, first_frame_steps=(2, 1, 1), video_steps=(1, 2, 1))
    assert np.array_equal(previews[0], full.frames[0][:1])  # later previews decode with one unit of context only


def test_callback_on_step_end_can_change_the_latents(pipe):
    def zero_at_the_end(pipe, step_index, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if pipe.progress.kind == "unit" else {}

    out = pipe.text_to_video("x", num_frames=9, seed=0, output_type="latent", callback_on_step_end=zero_at_the_end, **FAST)
    assert torch.equal(out.latents, torch.zeros_like(out.latents))
    plain = pipe.text_to_video("x", num_frames=9, seed=0, output_type="latent", **FAST)
    assert plain.latents.abs().sum() > 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs may name"):
        pipe.text_to_video("x", callback_on_step_end=zero_at_the_end, callback_on_step_end_tensor_inputs=["noise"])


def test_interrupt_after_a_finished_unit_keeps_what_was_made(pipe):
    def stop_after_unit_1(pipe, step_index, timestep, callback_kwargs):
        pipe._interrupt = pipe.progress.kind == "unit" and pipe.progress.unit == 1
        return {}

    out = pipe.text_to_video("x", num_frames=17, seed=0, callback_on_step_end=stop_after_unit_1, **FAST)
    assert out.interrupted and out.settings["interrupted"] and pipe.interrupt
    assert out.frames[0].shape == (9, 64, 64, 3)
    full = pipe.text_to_video("x", num_frames=17, seed=0, **FAST)
    assert not pipe.interrupt  # each call starts afresh
    assert np.array_equal(out.frames[0], full.frames[0][:9])


def test_interrupt_stops_within_one_step_and_drops_the_unfinished_unit(pipe):
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *args: calls.append(1))

    def stop_in_unit_2(pipe, step_index, timestep, callback_kwargs):
        pipe._interrupt = pipe.progress.unit == 2 and pipe.progress.stage == 0
        return {}

    try:
        out = pipe.text_to_video("x", num_frames=17, seed=0, first_frame_steps=(2, 2, 2), video_steps=(3, 3, 3),
                                 callback_on_step_end=stop_in_unit_2)
    finally:
        hook.remove()
    assert out.interrupted and out.frames[0].shape == (9, 64, 64, 3) and out.latents.shape[2] == 2
    assert len(calls) == 6 + 9 + 1  # units 0 and 1 whole, then the one step of unit 2 during which Stop came


def test_interrupt_during_the_first_unit_gives_no_frames(pipe):
    def stop_at_once(pipe, step_index, timestep, callback_kwargs):
        pipe._interrupt = True
        return {}

    out = pipe.text_to_video("x", num_frames=17, seed=0, callback_on_step_end=stop_at_once, **FAST)
    assert out.interrupted and out.frames[0].shape == (0, 64, 64, 3) and out.latents.shape[2] == 0


def test_output_types_and_tuple_return(pipe):
    latent = pipe.text_to_video("x", num_frames=9, seed=0, output_type="latent", **FAST)
    assert latent.frames is latent.latents and latent.latents.shape == (1, 4, 2, 8, 8)  # no decode
    assert not latent.latents.requires_grad  # sampled without an autograd graph (it doubled the studio's time)
    frames = pipe.text_to_video("x", num_frames=9, seed=0, **FAST).frames[0]
    images = pipe.text_to_video("x", num_frames=9, seed=0, output_type="pil", **FAST).frames[0]
    assert len(images) == 9 and np.array_equal(np.stack([np.asarray(i) for i in images]), frames)
    assert np.array_equal(pipe.decode_latents(latent.latents), frames)
    as_tuple, settings = pipe("x", num_frames=9, seed=0, return_dict=False, **FAST)
    assert np.array_equal(as_tuple[0], frames) and settings["seed"] == 0


def test_encode_prompt_and_prompt_embeds_give_the_same_video(pipe):
    text, negative = pipe.encode_prompt("a red circle", "blurry")
    direct = pipe.text_to_video("a red circle", negative_prompt="blurry", num_frames=9, seed=3, guidance_scale=4.0,
                                video_guidance_scale=3.0, **FAST)
    embedded = pipe.text_to_video(prompt_embeds=text, negative_prompt_embeds=negative, num_frames=9, seed=3,
                                  guidance_scale=4.0, video_guidance_scale=3.0, **FAST)
    assert np.array_equal(direct.frames[0], embedded.frames[0])
    assert pipe.encode_prompt("x", do_classifier_free_guidance=False)[1] is None
    with pytest.raises(ValueError, match="prompt_embeds must be the PromptEmbeddings of one prompt"):
        pipe.text_to_video(prompt_embeds=text.repeat(2), **FAST)


def test_duration_picks_the_nearest_allowed_length(pipe):
    assert frames_for_duration(2, 8, 8) == 17 and frames_for_duration(5, 24, 8) == 121 and frames_for_duration(0.01, 24, 8) == 1
    assert pipe.text_to_video("x", duration=1.1, seed=0, **FAST).frames[0].shape[0] == 9


def test_the_vaes_temporal_compression_sets_the_allowed_lengths(tmp_path):
    pipe = PyramidFlowPipeline.from_pretrained(build_tiny_checkpoint(tmp_path, frames_per_latent=4))
    assert pipe.spec.frames_per_latent == 4 and pipe.spec.max_frames == 9
    events = []
    clip = pipe.text_to_video("x", seed=0, callback_on_step_end=recorder(events),
                              callback_on_step_end_tensor_inputs=["video_latents"], **FAST)
    assert clip.frames[0].shape == (9, 64, 64, 3) and clip.latents.shape[2] == 3
    assert [len(pipe.unit_preview(kw["video_latents"])) for p, _, kw in events if p.kind == "unit"] == [1, 4, 4]
    assert pipe.text_to_video("x", duration=0.6, seed=0, **FAST).frames[0].shape[0] == 5
    extended = pipe.extend_video(clip.frames[0][:5], "more", num_frames=4, seed=1, **FAST)
    assert extended.frames[0].shape[0] == 9 and np.array_equal(extended.frames[0][:5], clip.frames[0][:5])
    with pytest.raises(ValueError, match=r"1 \+ 4k and at most 161 for this model \(1, 5, 9, 13, \.\.\., 161; 20 s at 8 fps\); got 165"):
        pipe.text_to_video("x", num_frames=165, seed=0, **FAST)
    with pytest.raises(ValueError, match="positive multiple of 4; got 6"):
        pipe.extend_video(clip.frames[0], "more", num_frames=6, seed=1, **FAST)


def test_guidance_off_runs_single_pass(pipe):
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, i, kw: calls.append(kw))
    try:
        pipe.text_to_image("x", guidance_scale=1.0, video_guidance_scale=1.0, seed=0, **FAST)
        single = len(calls)
        pipe.text_to_image("x", guidance_scale=5.0, seed=0, **FAST)
    finally:
        hook.remove()
    assert single == 3 and len(calls) == 6


def test_negative_prompt_changes_the_result(pipe):
    a = pipe.text_to_image("x", seed=0, **FAST)
    b = pipe.text_to_image("x", negative_prompt="blurry", seed=0, **FAST)
    assert not np.array_equal(a.frames[0], b.frames[0])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda p: p.text_to_video("x", num_frames=0), "num_frames must be 1 \\+ 8k"),
        (lambda p: p.text_to_video("x", num_frames=10), "num_frames must be 1 \\+ 8k"),
        (lambda p: p.text_to_video("x", num_frames=169), "at most 161"),
        (lambda p: p.text_to_video("x", height=100), "height must be a positive multiple of 64"),
        (lambda p: p.text_to_video("x", width=0), "width must be a positive multiple of 64"),
        (lambda p: p.text_to_video("  "), "prompt is empty"),
        (lambda p: p.text_to_video(None), "prompt is empty"),
        (lambda p: p.text_to_video(["a", (1, "b")]), "storyboard segment is a \\(seconds, prompt\\) pair"),
        (lambda p: p.text_to_video(3), "must be a string"),
        (lambda p: p.text_to_video("x", first_frame_steps=(0, 1, 1)), "first_frame_steps must be 3 positive integers"),
        (lambda p: p.text_to_video("x", video_steps=(1, 1)), "video_steps must be 3 positive integers"),
        (lambda p: p.text_to_video("x", guidance_scale=-1), "guidance_scale must be a number >= 0"),
        (lambda p: p.text_to_video("x", output_type="latents"), "output_type must be one of 'np', 'pil', 'pt', 'latent'"),
        (lambda p: p.text_to_video("x", guidance_scale=float("nan")), "guidance_scale must be a number >= 0"),
        (lambda p: p.text_to_video("x", duration=-2), "duration must be a positive"),
        (lambda p: p.image_to_video(np.zeros((8, 8), np.uint8), "x"), "RGB frames"),
        (lambda p: p.image_to_video(np.zeros((8, 8, 3), np.float32), "x"), "uint8"),
        (lambda p: p.image_to_video(np.zeros((8, 8, 3), np.uint8), "x", num_frames=1), "at least 9 frames"),
        (lambda p: p.extend_video(np.zeros((9, 8, 8, 3), np.uint8), "x", num_frames=5), "multiple of 8"),
        (lambda p: p.extend_video(np.zeros((9, 8, 8, 3), np.uint8), "x", num_frames=168), "at most 160 new frames"),
    ],
)
def test_bad_input_is_explained(pipe, call, message):
    with pytest.raises(ValueError, match=message):
        call(pipe)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(offload="model"), "on CPU use offload='none'"),
        (dict(offload="sometimes"), "unknown offload 'sometimes'; allowed: none, model, sequential, group"),
        (dict(quantize="nf4"), "needs a CUDA GPU; on CPU use quantize='int8'"),
        (dict(quantize="int4"), "unknown quantize"),
        (dict(torch_dtype="float16"), "float16 is not supported for generation on CPU"),
        (dict(torch_dtype="float64"), "unknown dtype"),
        (dict(quantize="int8", torch_dtype="bfloat16"), "computes in float32"),
    ],
)
def test_incompatible_memory_options_fail_clearly(checkpoint, options, message):
    with pytest.raises(ValueError, match=message):
        PyramidFlowPipeline.from_pretrained(checkpoint, device="cpu", **options)


def test_fp8_weight_storage_runs(checkpoint):
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint, quantize="fp8")
    assert any(p.dtype == torch.float8_e4m3fn for p in pipe.transformer.parameters())
    assert pipe.text_to_image("x", seed=0, **FAST).frames[0].shape == (1, 64, 64, 3)


def test_bfloat16_on_cpu(checkpoint):
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint, torch_dtype="bfloat16")
    out = pipe.text_to_video("x", num_frames=9, seed=0, **FAST)
    assert out.frames[0].shape == (9, 64, 64, 3) and out.settings["dtype"] == "bfloat16"


def test_vae_tiling_option(checkpoint):
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint, vae_tiling=True)
    assert pipe.settings_base["vae_tiling"]
    assert pipe.text_to_video("x", num_frames=9, seed=0, **FAST).frames[0].shape == (9, 64, 64, 3)


@pytest.mark.parametrize("offload", ["sequential", "group"])
def test_layer_offload_changes_no_pixel(checkpoint, pipe, offload):
    """The hooks of `sequential` and `group` (weights onloaded a layer or a block at a time) change where weights
    live, not what is computed: with the CPU as onload device the video equals the plain pipeline's."""
    offloaded = PyramidFlowPipeline.from_pretrained(checkpoint)
    offloaded._enable_layer_offload(torch.device("cpu"), offload)
    options = dict(num_frames=9, seed=0, **FAST)
    assert np.array_equal(offloaded.text_to_video("a red circle", **options).frames[0],
                          pipe.text_to_video("a red circle", **options).frames[0])


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["none", "model", "sequential", "group"])
def test_offload_modes_on_cuda(checkpoint, offload):
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint, device="cuda", torch_dtype="bfloat16", offload=offload)
    assert pipe.text_to_video("x", num_frames=9, seed=0, **FAST).frames[0].shape == (9, 64, 64, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["int8", "nf4", "fp8"])
def test_quantization_on_cuda(checkpoint, quantize):
    pytest.importorskip("bitsandbytes") if quantize != "fp8" else None
    pipe = PyramidFlowPipeline.from_pretrained(checkpoint, device="cuda", torch_dtype="bfloat16", quantize=quantize)
    assert pipe.text_to_image("x", seed=0, **FAST).frames[0].shape == (1, 64, 64, 3)


def test_sd3_family_generates_video(tmp_path_factory):
    pipe = PyramidFlowPipeline.from_pretrained(build_tiny_checkpoint(tmp_path_factory.mktemp("sd3"), "sd3"))
    out = pipe.text_to_video("a green triangle moving up", num_frames=17, seed=0, **FAST)
    assert pipe.family.name == "sd3" and out.frames[0].shape == (17, 64, 64, 3)
    assert out.latents.shape == (1, 4, 3, 8, 8)


def test_the_checkpoints_sampling_defaults_fill_what_the_caller_leaves_out(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "own-defaults")
    settings = json.loads((root / SETTINGS_FILE).read_text())
    settings["sampling"] = {"first_frame_steps": [1, 2, 1], "video_steps": [1, 1, 2], "guidance_scale": 2.5,
                            "video_guidance_scale": 1.5}
    (root / SETTINGS_FILE).write_text(json.dumps(settings))
    pipe = PyramidFlowPipeline.from_pretrained(root)
    events = []
    out = pipe.text_to_video("a red circle moving left", num_frames=9, seed=0, callback_on_step_end=recorder(events))
    assert (out.settings["first_frame_steps"], out.settings["video_steps"]) == ([1, 2, 1], [1, 1, 2])
    assert (out.settings["guidance_scale"], out.settings["video_guidance_scale"]) == (2.5, 1.5)
    assert len(events) == 4 + 4
    given = pipe.text_to_video("a red circle moving left", num_frames=9, seed=0, guidance_scale=3.0, **FAST)
    assert (given.settings["guidance_scale"], given.settings["video_guidance_scale"]) == (3.0, 1.5)
    assert given.settings["first_frame_steps"] == [1, 1, 1]
