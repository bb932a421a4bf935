"""The by-eye labels of the bundled model's clips and the benchmark that measures the detector against them."""
import json

from benchmarks import detector_agreement
from training.shapes_world import HELDOUT_STREAM, SHAPES, world_pairs


def test_labels_cover_every_heldout_pair_of_both_tasks():
    clips = json.loads(detector_agreement.LABELS.read_text())["clips"]
    pairs = world_pairs(0, HELDOUT_STREAM, 84)
    for task in detector_agreement.FRAMES_OF:
        assert [(c["prompt"], c["seed"]) for c in clips if c["task"] == task] == pairs
    assert {c["by_eye"] for c in clips} == set(SHAPES)


def test_reads_labelled_clips_and_reports_agreement(tmp_path):
    out = tmp_path / "figures.json"
    assert detector_agreement.main(["--count", "2", "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    for task in detector_agreement.FRAMES_OF:
        assert figures[task]["clips"] == 2 and sum(figures[task]["eye_vs_detector"].values()) == 2
        assert figures[task]["detector_agrees_with_eye"] == 1.0  # the first two of each task are read as seen


def test_refuses_labels_of_another_model(tmp_path, capsys):
    (tmp_path / "diffusion_transformer_64p").mkdir()
    (tmp_path / "diffusion_transformer_64p" / "diffusion_pytorch_model.safetensors").write_bytes(b"other weights")
    assert detector_agreement.main(["--model", str(tmp_path)]) == 2
    assert "not the model whose clips were labelled" in capsys.readouterr().err
