"""The `task: distill` recipe on a tiny random teacher: the student gets closer to the teacher's guided multi-step
output, its folder loads with its own few-step, guidance-free sampling defaults, and a run resumes exactly."""
import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model_core.loading import resolve_checkpoint
from model_core.pipeline import PyramidFlowPipeline
from model_core.pyramid import initial_noise, renoise_at_jump
from model_core.sampling import sample_video
from tests.training_helpers import CAPTIONS, launch_on_two_processes, precompute_features, tiny_overrides, tiny_world
from training.annotation_index import AnnotationIndex
from training.config import CONFIG_DIR, load_config
from training.distill_task import ColumnPlan, student_step, teacher_points
from training.loop import build_task
from training.objective import SampleChoices
from training.launch import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(CONFIG_DIR / "distill_tiny.yaml")
WEIGHTS = Path("diffusion_transformer_384p") / "diffusion_pytorch_model.safetensors"
TEACHER_STEPS, GUIDANCE = 5, 4.0
DISTILL = [f"distill.teacher_first_frame_steps=[{TEACHER_STEPS}, {TEACHER_STEPS}, {TEACHER_STEPS}]",
           f"distill.teacher_video_steps=[{TEACHER_STEPS}, {TEACHER_STEPS}, {TEACHER_STEPS}]",
           f"distill.guidance_scale={GUIDANCE}", f"distill.video_guidance_scale={GUIDANCE}",
           "train.ema_decay=null", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    checkpoint, annotations = tiny_world(root, videos=3, images=1)
    return checkpoint, *precompute_features(checkpoint, annotations, root / "features")


def distill(world, output, steps, *extra, resume=None):
    checkpoint, features, empty = world
    overrides = tiny_overrides(checkpoint, features, output, global_batch=2, empty_text_fea=empty)
    args = ["--config", RECIPE, "--max-steps", str(steps), *(["--resume", resume] if resume else []),
            *overrides, *DISTILL, *extra]
    assert main(args) == 0


def losses(output):
    with (Path(output) / "metrics.csv").open() as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def latents(pipe, seed, **options):
    return pipe.text_to_video(CAPTIONS[seed % 4], num_frames=9, seed=seed, output_type="latent", **options).latents


def distance_to_teacher(teacher, student) -> float:
    """Mean squared distance, on held-out seeds, of the student's latents at its own defaults (2-2-2, no guidance)
    to the teacher's at its guided 5-5-5 schedule."""
    steps = (TEACHER_STEPS,) * 3
    distances = [(latents(student, seed) - latents(teacher, seed, first_frame_steps=steps, video_steps=steps,
                                                   guidance_scale=GUIDANCE, video_guidance_scale=GUIDANCE)).pow(2).mean()
                 for seed in range(1000, 1004)]
    return float(torch.stack(distances).mean())


def test_teacher_points_are_the_teacher_levels_inside_a_student_step_with_its_ends():
    teacher = [1.0, 0.75, 0.5, 0.25, 0.001, 0.0]
    assert teacher_points(teacher, 1.0, 0.5) == [1.0, 0.75, 0.5]
    assert teacher_points(teacher, 0.6, 0.3) == [0.6, 0.5, 0.3]  # a student grid off the teacher's
    assert teacher_points(teacher, 0.25, 0.0) == [0.25, 0.001, 0.0]
    assert teacher_points(teacher, 0.7, 0.6) == [0.7, 0.6]  # no teacher level inside: one teacher step


@pytest.mark.slow
def test_distillation_brings_the_student_to_the_teacher(world, tmp_path):
    teacher = PyramidFlowPipeline.from_pretrained(world[0])
    distill(world, tmp_path / "start", 1, "optim.lr=0.0")  # a student equal to the teacher, in the student layout
    before = distance_to_teacher(teacher, PyramidFlowPipeline.from_pretrained(tmp_path / "start" / "checkpoint-1"))
    distill(world, tmp_path / "run", 40, "optim.lr=1.0e-3", "train.checkpoint_every=40")
    after = distance_to_teacher(teacher, PyramidFlowPipeline.from_pretrained(tmp_path / "run" / "checkpoint-40"))
    print(f"student's distance to the teacher's guided 5-5-5 latents: {before:.4f} before, {after:.4f} after 40 steps")
    assert after < 0.7 * before


@pytest.mark.parametrize("rollout_share", [0.0, 0.5])
def test_distillation_resumes_bitwise(world, tmp_path, rollout_share):
    share = [f"distill.student_rollout_share={rollout_share}"]
    distill(world, tmp_path / "straight", 4, *share)
    distill(world, tmp_path / "resumed", 2, *share, resume="auto")
    distill(world, tmp_path / "resumed", 4, *share, resume="auto")
    straight, resumed = (load_file(tmp_path / run / "checkpoint-4" / WEIGHTS) for run in ("straight", "resumed"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    assert all(loss > 0 for loss in losses(tmp_path / "straight"))


def test_student_folder_loads_with_its_few_step_guidance_free_schedule(world, tmp_path):
    distill(world, tmp_path / "run", 1)
    root = tmp_path / "run" / "checkpoint-1"
    sampling = resolve_checkpoint(root).family.sampling
    assert (sampling.first_frame_steps, sampling.video_steps) == ((2, 2, 2), (2, 2, 2))
    assert (sampling.guidance_scale, sampling.video_guidance_scale, sampling.stage_grid) == (1.0, 1.0, "trailing")
    student = PyramidFlowPipeline.from_pretrained(root)
    student.scheduler.set_timesteps(2, stage_index=2)
    assert student.scheduler.sigmas.tolist() == [1.0, 0.5, 0.0]  # two real steps, sampled as distilled
    result = student.text_to_video(CAPTIONS[0], num_frames=9, seed=0, output_type="latent")
    assert (result.settings["first_frame_steps"], result.settings["video_steps"]) == ([2, 2, 2], [2, 2, 2])
    assert (result.settings["guidance_scale"], result.settings["video_guidance_scale"]) == (1.0, 1.0)
    assert not student.official_defaults  # so guidance 1 runs one pass a step (guided only above 1)


@pytest.mark.slow
def test_student_rollouts_under_fsdp_on_two_processes_match_one_process(world, tmp_path):
    """Every sample the student's own: ranks whose columns need different numbers of rollout passes pad to the
    busiest rank's, so the sharded student gathers its weights as often on both and the run finishes, as one does."""
    share = "distill.student_rollout_share=1.0"
    distill(world, tmp_path / "one", 2, share, "train.gradient_accumulation_steps=2")
    checkpoint, features, empty = world
    overrides = tiny_overrides(checkpoint, features, tmp_path / "two", global_batch=2, empty_text_fea=empty)
    launch_on_two_processes(["--config", RECIPE, "--max-steps", "2", *overrides, *DISTILL, share])
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(world, tmp_path):
    """Global batch 2: 1 process x 2 accumulation steps vs 2 data-parallel processes x 1, as for every task."""
    distill(world, tmp_path / "one", 2, "train.gradient_accumulation_steps=2")
    checkpoint, features, empty = world
    overrides = tiny_overrides(checkpoint, features, tmp_path / "two", global_batch=2, empty_text_fea=empty)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "training.launch", "--config", RECIPE, "--max-steps", "2", *overrides, *DISTILL]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    one, two = load_file(tmp_path / "one" / "checkpoint-2" / WEIGHTS), load_file(tmp_path / "two" / "checkpoint-2" / WEIGHTS)
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_bundle_out_copies_the_last_checkpoint_as_a_bf16_model_folder(world, tmp_path):
    distill(world, tmp_path / "run", 1)
    out = tmp_path / "turbo"
    distill(world, tmp_path / "run", 1, f"bundle.out={out}", "bundle.model_card=training/configs/distill_tiny.yaml")
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert not (out / "training_state").exists() and (checkpoint / "training_state").is_dir()  # not retrained
    assert (out / "README.md").read_text() == Path(RECIPE).read_text()
    stored, trained = load_file(out / WEIGHTS), load_file(checkpoint / WEIGHTS)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert all(torch.equal(stored[k], trained[k].to(torch.bfloat16)) for k in trained)
    sampling = resolve_checkpoint(out).family.sampling
    assert (sampling.first_frame_steps, sampling.video_steps, sampling.guidance_scale) == ((2, 2, 2), (2, 2, 2), 1.0)
    bundled, full = (latents(PyramidFlowPipeline.from_pretrained(root), 1000) for root in (out, checkpoint))
    assert 0 < (bundled - full).abs().max() < 0.05 * full.abs().max()


def test_bundling_leaves_the_build_machines_paths_out_of_component_configs(tmp_path):
    from training.bundle import drop_build_paths

    (tmp_path / "causal_video_vae").mkdir()
    (tmp_path / "causal_video_vae" / "config.json").write_text('{"_name_or_path": "/work/runs/vae", "in_channels": 3}')
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "text_encoder" / "config.json").write_text('{"hidden_size": 32}')
    drop_build_paths(tmp_path)
    assert json.loads((tmp_path / "causal_video_vae" / "config.json").read_text()) == {"in_channels": 3}
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text()) == {"hidden_size": 32}


def test_student_steps_are_drawn_uniformly_over_the_units_steps():
    choices = lambda stage, sigma: SampleChoices(stage, 0.5, 0.5, 0.0, False, 0.0, sigma)
    # equal steps per stage give back the drawn stage and the step its sigma falls in
    assert [student_step(choices(s, u), [2, 2, 2]) for s in range(3) for u in (0.2, 0.7)] == \
        [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    # 1-1-2: each of the four steps a quarter of the time, so the full-resolution stage half of it
    drawn = [student_step(choices(s, (i + 0.5) / 100), [1, 1, 2]) for s in range(3) for i in range(100)]
    assert {step: drawn.count(step) for step in set(drawn)} == {(0, 0): 75, (1, 0): 75, (2, 0): 75, (2, 1): 75}


class ConstantStudent:
    """A student whose velocity is `value` everywhere, for following its Euler steps by hand; counts its passes."""

    def __init__(self, value: float):
        self.value, self.passes = value, 0

    def __call__(self, sample, return_dict, **_):
        self.passes += 1
        return ([torch.full_like(sample[0][-1], self.value)],)


@pytest.fixture()
def task(world, tmp_path):
    """The tiny recipe's distillation task: a 2-2-2 student on the trailing grid (sigmas 1, 0.5, 0 in every stage)."""
    checkpoint, features, empty = world
    config = load_config(RECIPE, [*tiny_overrides(checkpoint, features, tmp_path, empty_text_fea=empty), *DISTILL,
                                  "distill.student_rollout_share=1.0"])
    return build_task(config, AnnotationIndex(config["data"]["annotations"]), torch.device("cpu"))


def test_student_start_points_are_where_the_students_own_steps_take_the_noise(task):
    latents, c, scheduler = torch.randn(1, 4, 3, 8, 8), 0.3, task.student_scheduler

    def start(unit, stage, step, seed=7):
        student = ConstantStudent(c)
        x = task.student_start(student, latents, unit, 0.2, torch.Generator().manual_seed(seed), task.empty_text, stage, step)
        return x, student.passes

    noise = initial_noise((1, 4, 1, 8, 8), 3, torch.Generator().manual_seed(7))
    assert torch.equal(start(0, 0, 0)[0], noise) and start(0, 0, 0)[1] == 0  # the unit's start: no pass
    x, passes = start(0, 0, 1)
    assert passes == 1 and torch.allclose(x, noise - 0.5 * c)  # one Euler step from sigma 1 to 0.5
    generator = torch.Generator().manual_seed(7)
    noise = initial_noise((1, 4, 1, 8, 8), 3, generator)
    jumped = renoise_at_jump(noise - c, *scheduler.renoise_coefficients(1), generator=generator,
                             correlation=-scheduler.config.gamma)
    x, passes = start(0, 1, 0)
    assert passes == 2 and torch.allclose(x, jumped)  # the first stage's two steps, then the jump (Eq. 15)
    x, passes = start(2, 2, 1)  # a later unit: its history corrupted, the student's five steps before the last
    assert passes == 5 and x.shape == (1, 4, 1, 8, 8) and torch.isfinite(x).all()


def test_student_history_is_the_students_own_video_from_the_prompt(task):
    student, latents = ConstantStudent(0.3), torch.randn(1, 4, 3, 8, 8)
    history = task.student_history(student, latents, 2, torch.Generator().manual_seed(3), task.empty_text)
    assert student.passes == 12  # two units of the student's 2-2-2
    expected, _ = sample_video(lambda unit: lambda clips, t: torch.full_like(clips[-1], 0.3), task.student_scheduler,
                               (1, 4, 2, 8, 8), first_frame_steps=(2, 2, 2), video_steps=(2, 2, 2),
                               generator=torch.Generator().manual_seed(3))
    assert torch.equal(history, expected) and not torch.equal(history, latents[:, :, :2])


def test_rollout_passes_are_known_before_the_rollout(task):
    """The count ranks agree on before any pass (`DistillTask.columns`) is the count the rollout then runs."""
    text, seen = task.empty_text, set()
    for unit, stage, step in [(0, 0, 0), (0, 0, 1), (0, 2, 1), (1, 0, 0), (1, 1, 1), (2, 2, 0), (2, 2, 1)]:
        choices = SampleChoices(stage, 0.5, 0.5, 0.2, False, 0.0, 0.5)
        plan = ColumnPlan(choices, torch.Generator().manual_seed(0), torch.randn(1, 4, 3, 8, 8), unit, step, True)
        student = ConstantStudent(0.1)
        if unit:
            task.student_history(student, plan.latents, unit, plan.generator, text)
        task.student_start(student, plan.latents, unit, 0.2, plan.generator, text, stage, step)
        assert task.rollout_passes(plan) == student.passes
        seen.add(student.passes)
    assert task.rollout_passes(replace(plan, rollout=False)) == 0 and len(seen) == 7
