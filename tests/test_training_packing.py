"""Packed micro-batches (issue 36): a micro-batch's samples run as one sequence with the same per-sample losses and
gradients as one forward per sample, and the accumulation follows the world size from the recipe's token budget."""
import logging

import pytest
import torch

from tests.training_helpers import tiny_overrides, tiny_world
from training.config import CONFIG_DIR, load_config
from training.data import Annotation
from training.loop import Trainer, trainable
from training.packing import BatchPlanner, micro_batching

RECIPE = str(CONFIG_DIR / "tiny_shapes_flow.yaml")
PUBLISHED_ACCUMULATION = {"stage1_image": 4, "stage2_video_lowres": 2, "stage3_video_highres": 3}  # 128 GPUs


def trainer_for(root, family, *extra, global_batch=6, accumulation=1):
    checkpoint, annotations = tiny_world(root / "world", family=family, videos=3, images=3)
    overrides = tiny_overrides(checkpoint, annotations, root / "run", global_batch, accumulation or 1)
    if accumulation is None:  # derived from train.tokens_per_gpu
        overrides.append("train.gradient_accumulation_steps=null")
    return Trainer(load_config(RECIPE, [*overrides, "train.max_steps=1", *extra]), root / "run")


def losses_and_gradients(trainer, samples, packed: bool):
    trainer.task.packed = packed
    trainer.optimizer.zero_grad(set_to_none=True)
    out = trainer.task.losses(trainer.model, samples, 0)
    out["loss"].sum().backward()
    return out, {name: p.grad.clone() for name, p in trainable(trainer.model)}


@pytest.mark.parametrize("family", ["miniflux", "sd3"])
def test_packed_losses_and_gradients_equal_one_forward_per_sample(family, tmp_path):
    trainer = trainer_for(tmp_path, family)
    samples = [sample for sample, _ in next(iter(trainer.batches))]
    packed, packed_grads = losses_and_gradients(trainer, samples, packed=True)
    unpacked, grads = losses_and_gradients(trainer, samples, packed=False)
    frames = {sample.request.num_frames for sample in samples}
    assert len(samples) == 6 and 1 in frames and len(frames) > 1  # images and clips
    assert not trainer.task.text_of(samples[0], drop=False).attention_mask.bool().all()  # padding, left out when packed
    assert len(set(packed["stage"])) > 1 and packed["stage"] == unpacked["stage"]  # columns of different lengths
    torch.testing.assert_close(packed["loss"], unpacked["loss"], rtol=0, atol=1e-5)
    assert packed["loss"].min() > 0.01  # real losses, not zeros
    for name, grad in grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6)


def published_planner(name: str):
    """A recipe's planner over annotations at its first bucket (the token count of each sample's draw)."""
    config = load_config(CONFIG_DIR / f"{name}.yaml")
    height, width = config["data"]["buckets"][0]
    annotations = [Annotation("image", f"{i}.png", "a", height=height, width=width) for i in range(64)]
    if config["data"].get("clip_schedule"):
        annotations += [Annotation("video", f"{i}.mp4", "a", height=height, width=width) for i in range(64)]
    train = config["train"]
    planner = BatchPlanner(annotations, config["data"], config["objective"], 0, train["global_batch_size"], 1, 8)
    return planner, train


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACCUMULATION))
def test_published_recipes_derive_accumulation_from_the_world_size(name):
    planner, train = published_planner(name)
    sample_tokens = planner.mean_sample_tokens(train["max_steps"])
    batch, budget = train["global_batch_size"], train["tokens_per_gpu"]
    derived = {world: micro_batching(batch, world, budget, sample_tokens) for world in (1, 8, 128)}
    assert derived[128].accumulation == PUBLISHED_ACCUMULATION[name]  # Table 4's run on 128 GPUs
    for world, batching in derived.items():
        assert batching.tokens <= budget  # a micro-batch fits the budget ...
        assert batching.accumulation == 1 or batch * sample_tokens / (world * (batching.accumulation - 1)) > budget  # ... with the fewest micro-steps
        assert batching.samples * world * batching.accumulation == pytest.approx(batch)
    assert derived[1].accumulation > derived[8].accumulation > derived[128].accumulation


def test_stage2_accumulation_on_1_8_and_128_processes():
    planner, train = published_planner("stage2_video_lowres")
    sample_tokens = planner.mean_sample_tokens(train["max_steps"])  # the 5-s phase: longer than the 2-s one
    assert sample_tokens > float(torch.tensor([planner.cost(r) for r in planner.requests(0)]).double().mean())
    steps = [micro_batching(768, world, 4096, sample_tokens).accumulation for world in (1, 8, 128)]
    assert steps == [222, 28, 2]


def test_micro_batching_needs_a_sample_per_process():
    assert micro_batching(8, 8, 10, 1000.0).accumulation == 1  # one sample each even past the budget
    with pytest.raises(ValueError, match="smaller than the 16 processes"):
        micro_batching(8, 16, 4096, 100.0)


def test_trainer_derives_and_logs_the_accumulation(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="training.loop"):
        trainer = trainer_for(tmp_path, "miniflux", "train.tokens_per_gpu=1", global_batch=4, accumulation=None)
    assert trainer.accum == 4 and trainer.accelerator.gradient_accumulation_steps == 4
    assert "global batch 4 on 1 process(es): 4 accumulation step(s) of ~1.0 samples" in caplog.text
    assert len(next(iter(trainer.batches))) == 1  # one sample per micro-batch


def test_token_budget_and_accumulation_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="both train.tokens_per_gpu and train.gradient_accumulation_steps"):
        trainer_for(tmp_path, "miniflux", "train.tokens_per_gpu=4096")
