"""The shapes world: prompts, determinism, the motion it promises, and the files training reads."""
import json

import numpy as np
import pytest

from training.shapes_world import (
    DIRECTIONS,
    HELDOUT_STREAM,
    PALETTE,
    PROMPTS,
    TRAIN_STREAM,
    main,
    parse_prompt,
    render_clip,
    world_pairs,
)


def centroid(frame):
    rows, cols = np.nonzero(frame.max(axis=-1) > 60)
    return np.array([cols.mean(), rows.mean()])


def test_prompt_grammar_covers_every_colour_shape_and_direction():
    assert len(PROMPTS) == 7 * 3 * 4
    assert parse_prompt("a magenta triangle moving up") == ("magenta", "triangle", "up")
    with pytest.raises(ValueError, match="shapes-world prompt"):
        parse_prompt("a purple circle moving left")


def test_a_clip_is_a_function_of_prompt_and_seed():
    first = render_clip("a red circle moving right", 7)
    assert first.shape == (17, 64, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, render_clip("a red circle moving right", 7))
    assert not np.array_equal(first, render_clip("a red circle moving right", 8))


@pytest.mark.parametrize("prompt", PROMPTS[::5])
def test_clips_keep_the_subject_in_view_coloured_and_moving_a_third_of_the_frame(prompt):
    color, _, direction = parse_prompt(prompt)
    for seed in range(3):
        clip = render_clip(prompt, seed)
        area = clip.max(axis=-1).sum(axis=(1, 2)).astype(float)
        assert area.min() > 0.95 * area.max()  # never cut by the frame's edge
        travel = centroid(clip[-1]) - centroid(clip[0])
        assert np.dot(travel, DIRECTIONS[direction]) >= 64 / 3
        assert (clip[0] == PALETTE[color]).all(axis=-1).sum() > 50  # filled with the palette colour
        side = np.sqrt((clip[0].max(axis=-1) > 0).sum())
        assert 64 / 8 < side < 64 / 2.5  # roughly a quarter of the frame


def test_heldout_pairs_are_disjoint_from_training_and_cover_all_prompts():
    train, held = world_pairs(0, TRAIN_STREAM, 2 * len(PROMPTS)), world_pairs(0, HELDOUT_STREAM, len(PROMPTS))
    assert not set(train) & set(held)
    assert {p for p, _ in held} == set(PROMPTS)
    assert [p for p, _ in train].count(PROMPTS[0]) == 2


def test_writer_cli_writes_clips_training_can_read(tmp_path):
    from training.data import AnnotatedDataset, SampleRequest, read_annotations

    assert main(["--out", str(tmp_path), "--count", "3", "--seed", "1", "--heldout", "2"]) == 0
    entries, malformed = read_annotations(tmp_path / "train.jsonl")
    assert len(entries) == 3 and malformed == 0
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == 2
    sample, error = AnnotatedDataset(entries, [(64, 64)], 8, 8, False, False)[SampleRequest(0, 0, 0, 17, 0.0)]
    assert error is None and sample.pixels.shape == (1, 3, 17, 64, 64)
    record = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert record["text"] in PROMPTS
