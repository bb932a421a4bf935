"""benchmarks.official_side_by_side: its command line, the rotation of its rounds, its summary and the checkpoint
folder both sides load (the runs against the official code itself need a checkout: tests/test_gpu_benchmarks.py)."""
import json

import pytest

from benchmarks import official_side_by_side as side_by_side


def test_each_mode_fills_its_own_defaults():
    pipeline = side_by_side.parse_arguments(["--pipeline"])
    assert (pipeline.mode, pipeline.height, pipeline.width, pipeline.units) == ("pipeline", 384, 640, 4)
    assert (pipeline.first_frame_steps, pipeline.video_steps, pipeline.repeats) == ([4, 4, 4], [2, 2, 2], 2)
    sampler = side_by_side.parse_arguments([])
    assert (sampler.mode, sampler.height, sampler.width, sampler.units, sampler.repeats) == ("tiny", 64, 128, 5, 3)
    assert sampler.first_frame_steps == [20, 20, 20]
    given = side_by_side.parse_arguments(["--pipeline", "--units", "2", "--video-steps", "1", "2", "3"])
    assert (given.units, given.video_steps, given.first_frame_steps) == (2, [1, 2, 3], [4, 4, 4])


@pytest.mark.parametrize("argv", [["--pipeline", "--published"], ["--pipeline", "--repeats", "0"], ["--units", "0"]])
def test_contradictory_or_empty_runs_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        side_by_side.parse_arguments(argv)
    assert "error" in capsys.readouterr().err


def test_rounds_rotate_which_side_goes_first():
    assert side_by_side.rotated_order(1) == ["ours", "official"]
    assert side_by_side.rotated_order(3) == ["ours", "official", "official", "ours", "ours", "official"]


def test_summary_is_the_median_per_side_and_ours_over_official():
    runs = [{"side": side, "wall_s": wall, "cpu_s": wall / 2, "peak_rss_mib": 100.0 * wall, "generate_s": wall - 1}
            for side, wall in (("ours", 2.0), ("official", 8.0), ("official", 12.0), ("ours", 4.0), ("ours", 3.0),
                               ("official", 10.0))]
    summary = side_by_side.summarise(runs)
    assert summary["wall_s"] == {"ours": 3.0, "official": 10.0, "ratio": 0.3}
    assert summary["cpu_s"] == {"ours": 1.5, "official": 5.0, "ratio": 0.3}
    assert summary["peak_rss_mib"]["ratio"] == 0.3
    assert summary["generate_s"] == {"ours": 2.0, "official": 9.0, "ratio": 0.222}


def test_the_checkpoint_is_a_published_384p_layout_our_loader_reads(tmp_path):
    from model_core.loading import resolve_checkpoint

    root = side_by_side.write_pipeline_checkpoint(tmp_path / "checkpoint")
    for folder in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (root / folder).is_dir()
    transformer = json.loads((root / "diffusion_transformer_384p" / "config.json").read_text())
    assert transformer["_class_name"] == "PyramidFluxTransformer"  # the name the official loader's configs carry
    assert transformer["attention_head_dim"] == sum(transformer["axes_dims_rope"]) == 64  # what the official forces
    assert json.loads((root / "causal_video_vae" / "config.json").read_text())["_class_name"] == "CausalVideoVAE"
    checkpoint = resolve_checkpoint(root, "384p", "auto")
    assert (checkpoint.family.name, checkpoint.variant) == ("miniflux", "384p")
