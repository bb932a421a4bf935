import pytest
import torch

from model_core.storyboard import Segment, Storyboard, blend_embeddings, unit_texts
from model_core.text import PromptEmbeddings


def test_parse_reads_seconds_and_prompts_skipping_blank_and_comment_lines():
    board = Storyboard.parse("# a fox\n3 | a fox walks through snow\n\n 2.5|the fox stops and looks up \n")
    assert board.segments == (Segment(3.0, "a fox walks through snow"), Segment(2.5, "the fox stops and looks up"))
    assert board.seconds == 5.5
    assert Storyboard.parse(board.to_text()) == board


def test_prompts_may_contain_the_separator():
    assert Storyboard.parse("1 | left | right").prompts == ["left | right"]


@pytest.mark.parametrize("text,message", [
    ("", "holds no segments"),
    ("a fox walks", "line 1 has no '\\|'"),
    ("1 | ok\nsoon | later", "line 2 starts with 'soon', not a number"),
    ("0 | nothing", "segment 1 lasts 0.0 seconds"),
    ("-1 | backwards", "lasts -1.0 seconds"),
    ("nan | what", "lasts nan seconds"),
    ("1 | a\n2 |   ", "segment 2 has no prompt"),
])
def test_bad_storyboards_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        Storyboard.parse(text)


def test_coerce_accepts_pairs_dicts_text_and_settings():
    board = Storyboard.coerce([(1, "red right"), (1.0, "red left")])
    assert board == Storyboard.coerce("1 | red right\n1 | red left")
    assert Storyboard.coerce(board.to_settings()) == board
    blended = Storyboard(board.segments, blend=True)
    assert Storyboard.coerce(blended.to_settings()).blend is True
    with pytest.raises(ValueError, match="pair"):
        Storyboard.coerce([(1, "a", "b")])
    with pytest.raises(ValueError, match="at least one segment"):
        Storyboard.coerce([])
    with pytest.raises(ValueError, match="got int"):
        Storyboard.coerce(3)


def test_units_per_segment_at_the_bundled_models_fps():
    # 8 fps, 8 frames per latent: 1 s is the first frame + one unit (9 frames), a later 1 s one unit (8 frames)
    board = Storyboard.coerce([(1, "right"), (1, "left")])
    assert board.segment_units(8, 8) == [2, 1]
    assert board.num_frames(8, 8) == 9 + 8
    assert board.unit_segments(8, 8) == [0, 0, 1]
    assert board.segment_units(8, 8, continues=True) == [1, 1]
    assert board.num_frames(8, 8, continues=True) == 16


def test_units_at_the_published_fps_round_each_segment_to_whole_units():
    board = Storyboard.coerce([(3, "a fox walks"), (2, "the fox looks up")])
    # 3 s at 24 fps: 1 + 8k nearest 72 frames -> 73 frames, 10 units; 2 s: 48 new frames, 6 units
    assert board.segment_units(24, 8) == [10, 6]
    assert board.num_frames(24, 8) == 73 + 48
    # a short first segment is the first frame alone
    assert Storyboard.coerce([(0.01, "a"), (0.3, "b")]).unit_segments(24, 8) == [0, 1]


def embeddings(value, valid):
    mask = torch.zeros(1, 4, dtype=torch.long)
    mask[0, :valid] = 1
    return PromptEmbeddings(torch.full((1, 4, 2), float(value)), mask, torch.full((1, 3), float(value)))


def test_unit_texts_switch_at_segment_starts_and_blend_one_unit():
    a, b = embeddings(0, 2), embeddings(4, 3)
    assert unit_texts([0, 0, 1, 1], [a, b], blend=False) == [a, a, b, b]
    texts = unit_texts([0, 0, 1, 1], [a, b], blend=True)
    assert texts[:2] == [a, a] and texts[3] is b
    assert torch.equal(texts[2].hidden_states, torch.full((1, 4, 2), 2.0))
    assert torch.equal(texts[2].pooled, torch.full((1, 3), 2.0))
    assert texts[2].attention_mask.tolist() == [[1, 1, 1, 0]]


def test_blend_weight_ends_are_the_inputs():
    a, b = embeddings(1, 1), embeddings(3, 1)
    assert torch.equal(blend_embeddings(a, b, 0.0).hidden_states, a.hidden_states)
    assert torch.equal(blend_embeddings(a, b, 1.0).pooled, b.pooled)
