"""The detector reads world clips right, also after an mp4 round trip, and is not fooled by wrong ones."""
import numpy as np
import pytest

from training.shapes_detector import read_clip, read_frame
from training.shapes_world import DIRECTIONS, HELDOUT_STREAM, PROMPTS, parse_prompt, render_clip, world_pairs


def test_reads_every_heldout_clip_right():
    for prompt, seed in world_pairs(3, HELDOUT_STREAM, len(PROMPTS)):
        reading = read_clip(render_clip(prompt, seed))
        assert (reading.color, reading.shape, reading.direction) == parse_prompt(prompt), prompt


def test_reads_clips_after_an_mp4_round_trip(tmp_path):
    from model_core.media_files import read_video, write_video

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


def generated_look(frame: np.ndarray, trail: tuple) -> np.ndarray:
    """A world frame as the bundled model draws it: soft edges, a faint copy trailing the motion and a stray speck."""
    soft = frame.astype(float)
    for axis in (0, 1, 0, 1):  # two passes of a 3-pixel box blur
        soft = (np.roll(soft, 1, axis) + soft + np.roll(soft, -1, axis)) / 3
    trailed = np.maximum(soft, 0.45 * np.roll(soft, trail, axis=(0, 1)))
    trailed[2, 2] = 200
    return trailed.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("prompt", ["a red square moving right", "a cyan circle moving down", "a white triangle moving left",
                                    "a yellow square moving up", "a magenta triangle moving down", "a blue circle moving left"])
def test_reads_soft_trailed_frames_by_their_shape(prompt):
    _, shape, direction = parse_prompt(prompt)
    dx, dy = DIRECTIONS[direction]
    frames = render_clip(prompt, 5)[::4]
    for frame in frames:
        assert read_frame(generated_look(frame, (-3 * dy, -3 * dx))).shape == shape, prompt


def test_a_part_like_no_shape_has_none():
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[20:44, 30:33] = frame[30:33, 20:44] = 220  # a thin cross
    assert read_frame(frame).shape is None
    ring = render_clip("a green circle moving up", 2)[0].copy()
    inner = read_frame(ring).centroid
    ys, xs = np.mgrid[:64, :64]
    ring[(xs - inner[0]) ** 2 + (ys - inner[1]) ** 2 < 25] = 0  # hollowed out
    assert read_frame(ring).shape is None
