"""The evaluation runner scores a perfect generator 100% and a colour-blind one 0% on colour; the command
samples with the model's own defaults and draws its pairs from the stream it is given."""
import json
from types import SimpleNamespace

import pytest
import torch

from model_core.checkpoints import SETTINGS_FILE
from tiny_checkpoint import build_tiny_checkpoint
from training.evaluate_shapes import evaluate, main
from training.shapes_world import HELDOUT_STREAM, PROMPTS, TRAIN_STREAM, parse_prompt, render_clip, world_pairs


class IdentityVAE:
    dtype = torch.float32
    device = torch.device("cpu")

    def encode(self, video):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=video))

    def decode(self, latent):
        return SimpleNamespace(sample=latent)


class WorldPipeline:
    """Generates what the world would: the clip of (prompt, seed), optionally in another colour."""

    vae = IdentityVAE()

    def __init__(self, recolor=None):
        self.recolor = recolor

    def clip(self, prompt, seed):
        if self.recolor:
            prompt = prompt.replace(parse_prompt(prompt)[0], self.recolor)
        return SimpleNamespace(frames=render_clip(prompt, seed)[None])  # batched, as the pipeline's output

    def text_to_video(self, prompt, seed, num_frames, **options):
        return self.clip(prompt, seed)

    def image_to_video(self, image, prompt, seed, num_frames, **options):
        return self.clip(prompt, seed)

    def extend_video(self, video, prompt, seed, num_frames, **options):
        return self.clip(prompt, seed)


PAIRS = world_pairs(0, HELDOUT_STREAM, 12)


def test_a_generator_that_matches_the_world_scores_full_marks():
    figures = evaluate(WorldPipeline(), PAIRS, {"video_steps": (1, 1, 1)}, speed_runs=2)
    assert figures["text_to_video"] == {"color_accuracy": 1.0, "shape_accuracy": 1.0, "direction_accuracy": 1.0}
    assert figures["vae_round_trip"] == figures["text_to_video"]
    assert figures["image_to_video"] == {"keeps_color": 1.0, "keeps_shape": 1.0, "direction_accuracy": 1.0}
    assert figures["extension"] == {"keeps_color": 1.0, "keeps_shape": 1.0, "direction_accuracy": 1.0}
    assert figures["options"] == {"video_steps": [1, 1, 1]} and figures["seconds_per_17_frame_video"] >= 0


def test_a_wrong_colour_is_counted_wrong():
    pairs = [(p, s) for p, s in PAIRS if parse_prompt(p)[0] != "white"]
    figures = evaluate(WorldPipeline(recolor="white"), pairs, {}, speed_runs=0)
    assert figures["text_to_video"]["color_accuracy"] == 0.0
    assert figures["text_to_video"]["shape_accuracy"] == pytest.approx(1.0)


def test_the_command_samples_with_the_models_defaults_unless_told(tmp_path):
    root = build_tiny_checkpoint(tmp_path / "model")
    settings = json.loads((root / SETTINGS_FILE).read_text())
    settings["sampling"] = {"first_frame_steps": [1, 1, 1], "video_steps": [1, 1, 2], "guidance_scale": 2.0}
    (root / SETTINGS_FILE).write_text(json.dumps(settings))
    out = tmp_path / "figures.json"
    assert main(["--model", str(root), "--count", "1", "--speed-runs", "0", "--video-guidance-scale", "1.5",
                 "--out", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["options"] == {"first_frame_steps": [1, 1, 1], "video_steps": [1, 1, 2], "guidance_scale": 2.0,
                                  "video_guidance_scale": 1.5, "cache": "none", "cache_threshold": 0.05}
    assert figures["pairs"] == 1 and 0 <= figures["text_to_video"]["color_accuracy"] <= 1
    assert figures["stream"] == HELDOUT_STREAM


def test_a_tuning_stream_draws_seeds_outside_training_and_the_held_out_pairs(tmp_path, monkeypatch):
    import training.evaluate_shapes as module

    drawn = {}

    def record_pairs(pipe, pairs, options, speed_runs):
        drawn["pairs"] = pairs
        return {}

    monkeypatch.setattr(module, "evaluate", record_pairs)
    root = build_tiny_checkpoint(tmp_path / "model")
    assert main(["--model", str(root), "--count", "84", "--stream", "2", "--speed-runs", "0"]) == 0
    seeds = {seed for _, seed in drawn["pairs"]}
    assert len(seeds) == 84 and sorted({p for p, _ in drawn["pairs"]}) == sorted(PROMPTS)
    assert not seeds & {s for _, s in world_pairs(0, TRAIN_STREAM, 840)}
    assert not seeds & {s for _, s in world_pairs(0, HELDOUT_STREAM, 84)}


def test_the_training_stream_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "unused", "--stream", str(TRAIN_STREAM)])
    assert "is not an evaluation stream" in capsys.readouterr().err
