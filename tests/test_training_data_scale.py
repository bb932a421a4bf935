"""Data at scale (issue 36): each rank plans only its own samples from the index's metadata (no annotation line is
read), and text features are stored in bfloat16 with the T5 states trimmed to their mask."""
import json

import pytest
import torch
from safetensors.torch import save_file

from model_core.text import PromptEmbeddings
from training.annotation_index import AnnotationIndex
from training.data import load_text_features, read_annotations, stored_text_features
from training.packing import BatchPlanner

DATA = {"buckets": [[384, 640], [640, 384], [512, 512]], "fps": 24, "image_ratio": 0.25,
        "clip_schedule": [{"until_step": None, "seconds": [2, 5]}]}
OBJECTIVE = {"stages": 3, "history_noise_max": 0.33, "text_dropout": 0.1}


def annotations(tmp_path, count=200):
    lines = [{"image" if row % 4 == 0 else "video": f"m{row}", "text": f"caption {row}",
              "height": [384, 640, 512][row % 3], "width": [640, 384, 512][row % 3]} for row in range(count)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_index_holds_kind_and_size_so_planning_reads_no_line(tmp_path, monkeypatch):
    path = annotations(tmp_path)
    index = AnnotationIndex(path)
    assert index.meta([0, 1, 2]).tolist() == [[1, 384, 640, -1], [0, 640, 384, -1], [0, 512, 512, -1]]
    on_list = BatchPlanner(read_annotations(path)[0], DATA, OBJECTIVE, 3, 32, 8, 8)
    monkeypatch.setattr(AnnotationIndex, "line", lambda self, row: pytest.fail("planning read an annotation line"))
    on_index = BatchPlanner(index, DATA, OBJECTIVE, 3, 32, 8, 8)
    for step in range(3):
        assert on_index.bins(step) == on_list.bins(step)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_each_rank_plans_its_own_share_and_together_they_cover_the_global_batch(tmp_path, world):
    index = AnnotationIndex(annotations(tmp_path))
    planner = BatchPlanner(index, DATA, OBJECTIVE, 3, 32, world * 2, 8)
    for step in range(3):
        everything = {r.slot: r for r in planner.requests(step)}
        shares = [planner.rank_bins(step, rank, world) for rank in range(world)]
        assert all(len(share) == 2 and all(share) for share in shares)  # two micro-steps each, none empty
        planned = [r for share in shares for b in share for r in b]
        assert sorted(r.slot for r in planned) == list(range(32))  # every slot once, on one rank
        assert all(r == everything[r.slot] for r in planned)  # what a rank plans is what one process plans


def embeddings(valid: int, length: int = 16, dim: int = 8) -> PromptEmbeddings:
    generator = torch.Generator().manual_seed(valid)
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[:, :valid] = 1
    return PromptEmbeddings(torch.randn(1, length, dim, generator=generator), mask, torch.randn(1, 4, generator=generator))


@pytest.mark.parametrize("valid", [1, 5, 16])
def test_text_features_round_trip_in_bfloat16_trimmed_to_their_mask(tmp_path, valid):
    original = embeddings(valid)
    stored = stored_text_features(original)
    assert stored["hidden_states"].dtype == torch.bfloat16 and stored["hidden_states"].shape == (1, valid, 8)
    save_file(stored, str(tmp_path / "f.safetensors"))
    loaded = load_text_features(tmp_path / "f.safetensors")
    assert loaded.hidden_states.shape == (1, 16, 8) and loaded.hidden_states.dtype == torch.float32
    assert torch.equal(loaded.attention_mask, original.attention_mask)
    torch.testing.assert_close(loaded.hidden_states[:, :valid], original.hidden_states[:, :valid], rtol=2 ** -8, atol=0)
    assert not loaded.hidden_states[:, valid:].any()  # masked padding: zeros
    torch.testing.assert_close(loaded.pooled, original.pooled, rtol=2 ** -8, atol=0)
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    assert size(stored["hidden_states"]) == size(original.hidden_states) * valid // 16 // 2


def test_features_stored_before_trimming_still_load(tmp_path):
    original = embeddings(5)
    save_file({"hidden_states": original.hidden_states, "attention_mask": original.attention_mask,
               "pooled": original.pooled}, str(tmp_path / "old.safetensors"))
    loaded = load_text_features(tmp_path / "old.safetensors")
    assert torch.equal(loaded.hidden_states, original.hidden_states)
