"""The detector reads world clips right, also after an mp4 round trip, and is not fooled by wrong ones."""
import numpy as np
import pytest

from training.shapes_detector import read_clip
from training.shapes_world import HELDOUT_STREAM, PROMPTS, parse_prompt, render_clip, world_pairs


def test_reads_every_heldout_clip_right():
    for prompt, seed in world_pairs(3, HELDOUT_STREAM, len(PROMPTS)):
        reading = read_clip(render_clip(prompt, seed))
        assert (reading.color, reading.shape, reading.direction) == parse_prompt(prompt), prompt


def test_reads_clips_after_an_mp4_round_trip(tmp_path):
    from pyramid_app.video import read_video, write_video

    for index, prompt in enumerate(PROMPTS[::7]):
        path = write_video(render_clip(prompt, index), tmp_path / f"{index}.mp4", 8, {})
        reading = read_clip(read_video(path)[0])
        assert (reading.color, reading.shape, reading.direction) == parse_prompt(prompt), prompt


@pytest.mark.parametrize("truth,shown", [("a red circle moving right", "a blue circle moving right"),
                                         ("a red circle moving right", "a red square moving right"),
                                         ("a red circle moving right", "a red triangle moving right"),
                                         ("a red circle moving right", "a red circle moving left")])
def test_a_wrong_clip_is_read_as_wrong(truth, shown):
    reading = read_clip(render_clip(shown, 0))
    assert (reading.color, reading.shape, reading.direction) != parse_prompt(truth)


def test_a_still_or_empty_clip_has_no_direction():
    clip = render_clip("a green square moving up", 1)
    assert read_clip(np.repeat(clip[:1], 17, axis=0)).direction is None
    empty = read_clip(np.zeros_like(clip))
    assert (empty.color, empty.shape, empty.direction) == (None, None, None)
