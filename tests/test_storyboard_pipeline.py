"""Storyboards, long videos and streamed frames in the pipeline: the bundled model (8 fps, 8 frames per latent) and a
tiny random checkpoint."""
import numpy as np
import pytest
import torch

from model_core import PyramidFlowPipeline, generation_runner
from model_core.media_files import read_metadata, write_video
from model_core.storyboard import Storyboard
from pyramid_app.studio import gallery
from pyramid_app.options.settings import BUNDLED_MODEL
from tiny_checkpoint import build_tiny_checkpoint

FAST = dict(first_frame_steps=(1, 1, 1), video_steps=(1, 1, 1))
RIGHT_THEN_LEFT = [(1, "a red circle moving right"), (1, "a red circle moving left")]


@pytest.fixture(scope="module")
def bundled():
    return PyramidFlowPipeline.from_pretrained(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return PyramidFlowPipeline.from_pretrained(build_tiny_checkpoint(tmp_path_factory.mktemp("miniflux")))


class FrameList:
    """A `stream_to` target that keeps what it is given, chunk by chunk."""

    def __init__(self):
        self.chunks = []

    def write(self, frames):
        self.chunks.append(frames.copy())

    @property
    def frames(self):
        return np.concatenate(self.chunks)


def texts_per_unit(pipe, monkeypatch) -> list:
    """The prompt states each unit is generated with, in order (the pipeline asks for one velocity per unit)."""
    seen, velocity = [], generation_runner.unit_velocity

    def recording(pipe, text, negative, scale, *prepared):
        seen.append(text.hidden_states.clone())
        return velocity(pipe, text, negative, scale, *prepared)

    monkeypatch.setattr(generation_runner, "unit_velocity", recording)
    return seen


def embedding(pipe, prompt):
    return pipe.encode_prompt(prompt, do_classifier_free_guidance=False)[0].hidden_states


def test_two_segments_with_the_bundled_model_give_the_summed_frame_count(bundled):
    out = bundled(RIGHT_THEN_LEFT, seed=0, **FAST)
    assert out.frames[0].shape == (9 + 8, 64, 64, 3)
    assert out.settings["storyboard"] == {"segments": [{"seconds": 1.0, "prompt": "a red circle moving right"},
                                                       {"seconds": 1.0, "prompt": "a red circle moving left"}],
                                          "blend": False}
    assert out.settings["prompt"] == "a red circle moving right" and out.settings["num_frames"] == 17


def test_text_switches_at_the_unit_where_the_segment_starts(bundled, monkeypatch):
    seen = texts_per_unit(bundled, monkeypatch)
    bundled(RIGHT_THEN_LEFT, seed=0, **FAST)
    right, left = embedding(bundled, RIGHT_THEN_LEFT[0][1]), embedding(bundled, RIGHT_THEN_LEFT[1][1])
    assert len(seen) == 3  # units: the first frame, one of the first second, one of the second
    assert [torch.equal(t, right) for t in seen] == [True, True, False]
    assert torch.equal(seen[2], left)


def test_blend_mixes_the_two_texts_on_the_first_unit_after_the_switch(tiny, monkeypatch):
    seen = texts_per_unit(tiny, monkeypatch)
    board = Storyboard.coerce({"segments": [{"seconds": 0.5, "prompt": p} for p in ("red", "blue", "green")], "blend": True})
    tiny.text_to_video(board, seed=0, **FAST)
    red, blue, green = (embedding(tiny, p) for p in ("red", "blue", "green"))
    # 0.5 s at 8 fps: the first segment is the first frame alone (unit 0), each later one a unit of 8 frames
    assert len(seen) == 3
    assert torch.equal(seen[0], red)
    assert torch.allclose(seen[1], (red + blue) / 2) and torch.allclose(seen[2], (blue + green) / 2)


def test_one_segment_equals_text_to_video_bit_for_bit(bundled):
    plain = bundled.text_to_video("a blue square moving up", duration=2, seed=7, **FAST)
    boarded = bundled.text_to_video([(2, "a blue square moving up")], seed=7, **FAST)
    assert np.array_equal(plain.frames, boarded.frames) and torch.equal(plain.latents, boarded.latents)


def test_image_and_extension_take_a_storyboard(tiny, monkeypatch):
    image = np.full((64, 64, 3), 120, np.uint8)
    out = tiny.image_to_video(image, storyboard=[(1, "red"), (1, "blue")], seed=0, **FAST)
    assert out.frames[0].shape[0] == 17 and out.settings["mode"] == "image_to_video"
    seen = texts_per_unit(tiny, monkeypatch)
    clip = tiny.text_to_video("red", num_frames=9, seed=0, **FAST).frames[0]
    seen.clear()
    extended = tiny.extend_video(clip, [(1, "blue"), (1, "green")], seed=1, **FAST)
    assert extended.frames[0].shape[0] == 9 + 16 and np.array_equal(extended.frames[0][:9], clip)
    assert [torch.equal(t, embedding(tiny, p)) for t, p in zip(seen, ("blue", "green"))] == [True, True]


def test_settings_round_trip_through_the_mp4_and_reuse(bundled, tmp_path):
    out = bundled(RIGHT_THEN_LEFT, seed=3, **FAST)
    path = write_video(out.frames[0], tmp_path / "story.mp4", out.fps, out.settings)
    settings = gallery.saved_settings(path)
    assert settings["storyboard"] == out.settings["storyboard"]
    values = gallery.control_values(settings)
    assert values["storyboard"] == [[1.0, "a red circle moving right"], [1.0, "a red circle moving left"]]
    again = bundled(Storyboard.coerce(settings["storyboard"]), seed=settings["seed"], **FAST)
    assert np.array_equal(again.frames, out.frames)


@pytest.mark.parametrize("call,message", [
    (lambda p: p.text_to_video([(1, "a")], num_frames=9), "a storyboard sets the length"),
    (lambda p: p.text_to_image([(1, "a")]), "needs a video mode"),
    (lambda p: p.text_to_video("a", storyboard=[(1, "b")]), "not both"),
    (lambda p: p.text_to_video([(1, "a"), (0, "b")]), "segment 2 lasts 0 seconds"),
    (lambda p: p.text_to_video([(15, "a"), (6, "b")]), "at most 161 for this model .*20 s at 8 fps"),
])
def test_bad_storyboards_are_refused_with_a_sentence(tiny, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny)


def test_videos_run_past_the_published_length_up_to_twenty_seconds(tiny):
    out = tiny.text_to_video("x", num_frames=25, seed=0, **FAST)  # the checkpoint's trained maximum is 17
    assert out.frames[0].shape[0] == 25 and out.latents.shape[2] == 4
    with pytest.raises(ValueError, match="at most 161 for this model"):
        tiny.text_to_video("x", num_frames=169)


@pytest.mark.parametrize("mode", ["text_to_video", "image_to_video", "extend_video"])
def test_streamed_frames_equal_the_decoded_output(tiny, mode):
    inputs = {"text_to_video": (), "image_to_video": (np.full((64, 64, 3), 90, np.uint8),),
              "extend_video": (tiny.text_to_video("a", num_frames=9, seed=2, **FAST).frames[0],)}[mode]
    length = 16 if mode == "extend_video" else 25
    whole = getattr(tiny, mode)(*inputs, "x", num_frames=length, seed=5, **FAST)
    sink = FrameList()
    streamed = getattr(tiny, mode)(*inputs, "x", num_frames=length, seed=5, stream_to=sink, **FAST)
    assert streamed.frames is None and streamed.settings["num_frames"] == len(sink.frames) == len(whole.frames[0])
    assert len(sink.chunks) == {"text_to_video": 4, "image_to_video": 4, "extend_video": 3}[mode]
    assert np.abs(sink.frames.astype(int) - whole.frames[0]).max() <= 1  # float rounding of the chunked causal decode
    assert streamed.settings == {**whole.settings, "num_frames": len(whole.frames[0])}


# --- the command line: --storyboard FILE, also into a queue ---------------------------------------------


def test_cli_storyboard_file_makes_the_summed_length_and_records_it(tmp_path, capsys):
    from pyramid_app import cli

    (tmp_path / "story.txt").write_text("# right, then left\n1 | a red circle moving right\n1 | a red circle moving left\n")
    out = tmp_path / "story.mp4"
    fast = ["--first-frame-steps", "1,1,1", "--video-steps", "1,1,1", "--quiet"]
    assert cli.main(["generate", "--storyboard", str(tmp_path / "story.txt"), "--out", str(out), "--seed", "3", *fast]) == 0
    settings = read_metadata(out)
    assert settings["num_frames"] == 17 and [s["prompt"] for s in settings["storyboard"]["segments"]] == [
        "a red circle moving right", "a red circle moving left"]
    queue_file = tmp_path / "queue.json"
    assert cli.main(["generate", "--storyboard", str(tmp_path / "story.txt"), "--out", str(out), "--save-queue",
                     str(queue_file), *fast]) == 0
    from pyramid_app.jobs.queue import read_queue

    assert read_queue(queue_file)[0][0].storyboard == settings["storyboard"]
    (tmp_path / "bad.txt").write_text("1 | fine\nsoon | later\n")
    capsys.readouterr()
    assert cli.main(["generate", "--storyboard", str(tmp_path / "bad.txt"), "--out", str(out)]) == cli.EXIT_USAGE
    assert "bad.txt: storyboard line 2 starts with 'soon', not a number" in capsys.readouterr().err
    assert cli.main(["generate", "--storyboard", str(tmp_path / "story.txt"), "--out", str(out),
                     "--num-frames", "9"]) == cli.EXIT_USAGE
