"""Few-step, guidance-free distillation of a Pyramid Flow checkpoint (issue 33) as a training task.

Method: guidance distillation (Meng et al., CVPR 2023) fused with trajectory (step) distillation per pyramid
stage in the manner of progressive distillation (Salimans & Ho, ICLR 2022). The student, initialised from the
teacher, runs one pass per step on the prompt alone; its single Euler step over an interval [sigma_a, sigma_b]
of its own schedule (`distill.first_frame_steps` / `distill.video_steps`, the grid the pipeline samples with)
regresses the teacher's guided Euler steps over the same interval on the teacher's inference grid
(`distill.teacher_first_frame_steps` / `distill.teacher_video_steps`, plus the interval's ends where they fall
between its levels), so the guidance scale is baked in. `distill.stage_grid: trailing` gives the student n equal
steps from 1 to 0 per stage (the official grid's last step, 0.001 -> 0, changes next to nothing: n official steps
act as n - 1); the student's folder records it, and the pipeline samples it on that grid. Each of a unit's student
steps is drawn equally often (`student_step`).
The jumps between stages (upsample + renoise, Eq. 15) stay as they are, the points x_{sigma_a} lie on the
stage's coupled path (Eqs. 6, 9-10) and the history is the objective's temporal-pyramid history, built with
the functions the pipeline uses: one student pass per sample, which trains on a CPU. `distill.student_rollout_share`
of the samples are instead the student's own, as Self Forcing trains a causal student on its own rollouts (Huang et
al. 2025): the history it generates from the prompt (`student_history`) and the point its own steps take the unit's
noise to (`student_start`), run by the pipeline's sampler without gradients, so the teacher shows the student how to
go on from its own mistakes. PyramidalWan (Korzhenkov et al., arXiv 2601.04792) distils a pyramid to 2-2-2 steps with
DMD or adversarial losses, the next step for quality beyond this regression.
"""
import json
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from model_core.checkpoints import SETTINGS_FILE
from model_core.pyramid import initial_noise, interpolate_on_path, latent_pyramid, renoise_at_jump
from model_core.sampling import sample_unit, sample_video
from model_core.scheduler import PyramidFlowScheduler

from .atomic import write_text
from .flow_task import FlowTask
from .models import build_transformer
from .objective import (Column, SampleChoices, column_tokens, corrupt_history, corrupted_history, stage_endpoints,
                        unit_index)


@dataclass(frozen=True)
class ColumnPlan:
    """A sample's draws for its column: its choices (stage included), the generator to go on with, its clean latents,
    its unit, the student step in the stage, and whether the student rolls the sample out itself."""

    choices: SampleChoices
    generator: torch.Generator
    latents: torch.Tensor
    unit: int
    step: int
    rollout: bool


def student_step(choices, steps_per_stage: list) -> tuple:
    """(stage, step) drawn uniformly over all the unit's student steps, so every step a sampler takes is trained
    equally often: (stage + sigma) / stages is uniform on [0, 1) and picks one of them (equal steps per stage
    give back the drawn stage and step)."""
    u = (choices.stage + choices.sigma) / len(steps_per_stage)
    k = min(int(u * sum(steps_per_stage)), sum(steps_per_stage) - 1)
    for stage, steps in enumerate(steps_per_stage):
        if k < steps:
            return stage, k
        k -= steps


def teacher_points(teacher_sigmas: list, start: float, end: float) -> list:
    """The stage-local noise levels of the teacher's steps across one student step from `start` down to `end`: the
    teacher grid's levels strictly between, with both ends (any student grid against any teacher grid)."""
    return [start, *(sigma for sigma in teacher_sigmas if end < sigma < start), end]


class DistillTask(FlowTask):
    """Trains a few-step, guidance-free student (the task's `model`, initialised from `model.pretrained`)
    against that checkpoint as a frozen teacher."""

    def __init__(self, config: dict, annotations: list, device):
        super().__init__(config, annotations, device)
        self.distill = config["distill"]
        self.rollout_share = self.distill.get("student_rollout_share", 0.0)
        if not 0 <= self.rollout_share <= 1:
            raise ValueError(f"distill.student_rollout_share is the share of samples the student generates itself; "
                             f"it must lie in [0, 1], got {self.rollout_share}")
        self.teacher = build_transformer({**self.model_config, "lora": None, "gradient_checkpointing": False},
                                         self.base, self.seed).to(device).eval().requires_grad_(False)
        self.student_scheduler = PyramidFlowScheduler(stages=self.objective["stages"],
                                                      stage_grid=self.distill.get("stage_grid", "official"))

    def schedule(self, unit: int) -> tuple:
        """(student steps, teacher steps, guidance scale) per stage of the first frame or a later unit."""
        name, scale = ("video_steps", "video_guidance_scale") if unit else ("first_frame_steps", "guidance_scale")
        return self.distill[name], self.distill[f"teacher_{name}"], self.distill[scale]

    @staticmethod
    def grid(scheduler, steps: int, stage: int) -> list:
        """The stage-local sigmas `scheduler` steps through with `steps` steps in `stage`."""
        scheduler.set_timesteps(steps, stage_index=stage)
        return scheduler.sigmas.tolist()

    def guided_velocity(self, clips: list, t, text, scale: float) -> torch.Tensor:
        """The teacher's classifier-free guided velocity (Eq. 17's sampler, as the pipeline computes it)."""
        both = self.empty_text.to(self.device).followed_by(text).without_padding_columns()
        v = self.teacher(sample=[[torch.cat([c, c]) for c in clips]], encoder_hidden_states=both.hidden_states,
                         encoder_attention_mask=both.attention_mask, pooled_projections=both.pooled,
                         timestep=t.reshape(1).expand(2), return_dict=False)[0][0].float()
        unconditional, conditional = v.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    @torch.no_grad()
    def teacher_target(self, clips: list, x, points: list, stage: int, text, scale: float):
        """The velocity whose one Euler step from points[0] reaches where the teacher's guided Euler steps through
        `points` (stage-local sigmas) go: (x_b - x_a) / (sigma_b - sigma_a)."""
        window, start = self.scheduler.windows[stage], x
        for sigma, sigma_next in zip(points, points[1:]):
            t = torch.tensor(window.timestep(sigma), dtype=torch.float32, device=self.device)
            v = self.guided_velocity([*clips, x], t, text, scale)
            x = x.float() + (sigma_next - sigma) * v
        return (x - start) / (points[-1] - points[0])

    def student_velocity(self, student, text):
        """The student's unguided velocity on `text`, one column at a time, as the sampler calls it (rollout steps,
        run under no_grad by the callers)."""
        def velocity(clips, t, **_):
            return student(sample=[clips], encoder_hidden_states=text.hidden_states,
                           encoder_attention_mask=text.attention_mask, pooled_projections=text.pooled,
                           timestep=torch.tensor([float(t)], device=self.device),
                           return_dict=False, packed=self.packed)[0][0].float()

        return velocity

    @torch.no_grad()
    def student_history(self, student, latents, unit: int, generator, text) -> torch.Tensor:
        """The `unit` latent frames before the sample's unit as the student generates them from the prompt (Eq. 17's
        sampler on the student's schedules)."""
        velocity = self.student_velocity(student, text)
        shape = (*latents.shape[:2], unit, *latents.shape[3:])
        steps = {"first_frame_steps": self.distill["first_frame_steps"], "video_steps": self.distill["video_steps"]}
        frames, _ = sample_video(lambda _: velocity, self.student_scheduler, shape, generator=generator,
                                 device=self.device, **steps)
        return frames

    @torch.no_grad()
    def student_start(self, student, latents, unit: int, strength: float, generator, text, stage: int, step: int):
        """Where the student's own steps (the sampler, Algorithm 1, on the student's schedule with its jumps, Eq. 15)
        take the unit's initial noise by the start of `step` in `stage`, conditioned on the clip's history corrupted
        to `strength` (Eq. 16)."""
        scheduler, steps, stages = self.student_scheduler, self.schedule(unit)[0], self.student_scheduler.config.stages
        pyramid = latent_pyramid(latents[:, :, :unit], stages) if unit else []
        history = [corrupt_history(level, strength, generator) for level in pyramid]
        x = initial_noise(latents[:, :, unit : unit + 1].shape, stages, generator, self.device)
        last = (stage, step - 1) if step else (stage - 1, steps[stage - 1] - 1)  # the step before `step`
        if last[0] < 0:
            return x
        reached = []

        def keep(s, j, t, latent):
            if (s, j) == last:
                reached.append(latent)
            return latent

        sample_unit(self.student_velocity(student, text), scheduler, x, history, unit, steps, generator,
                    on_step=keep, stop=lambda: bool(reached))
        if step:
            return reached[0]
        scale, noise_std = scheduler.renoise_coefficients(stage)
        return renoise_at_jump(reached[0], scale, noise_std, generator=generator, correlation=-scheduler.config.gamma)

    def plan(self, sample, step: int) -> ColumnPlan:
        """What the sample's column is drawn to be, before any transformer pass."""
        choices, generator = self.draw(step, sample.request.slot)
        latents = self.clean_latents(sample)
        unit = unit_index(choices, latents.shape[2])
        stage, j = student_step(choices, self.schedule(unit)[0])
        rollout = bool(self.rollout_share) and torch.rand(1, generator=generator).item() < self.rollout_share
        return ColumnPlan(replace(choices, stage=stage), generator, latents, unit, j, rollout)

    def rollout_passes(self, plan: ColumnPlan) -> int:
        """Student passes of the plan's rollout: its history's units (`student_history`), then its steps before the
        start point (`student_start`)."""
        if not plan.rollout:
            return 0
        first, video = (sum(self.schedule(unit)[0]) for unit in (0, 1))
        history = first + (plan.unit - 1) * video if plan.unit else 0
        return history + sum(self.schedule(plan.unit)[0][: plan.choices.stage]) + plan.step

    def column(self, plan: ColumnPlan, sample, student) -> tuple:
        """One student column (history, x at a student step's start) and its distilled velocity target."""
        choices, generator, latents, unit, j = plan.choices, plan.generator, plan.latents, plan.unit, plan.step
        student_steps, teacher_steps, scale = self.schedule(unit)
        stage = choices.stage
        text = self.text_of(sample, False).to(self.device)
        if plan.rollout and unit:
            history = self.student_history(student, latents, unit, generator, text)
            latents = torch.cat([history, latents[:, :, unit:]], dim=2)
        history = corrupted_history(latents, choices, generator, self.scheduler.config.stages)
        sigmas = self.grid(self.student_scheduler, student_steps[stage], stage)
        timestep = float(self.student_scheduler.timesteps[j])
        points = teacher_points(self.grid(self.scheduler, teacher_steps[stage], stage), sigmas[j], sigmas[j + 1])
        if plan.rollout:
            x = self.student_start(student, latents, unit, choices.history_strength, generator, text, stage, j)
        else:
            start, end = stage_endpoints(latents[:, :, unit : unit + 1], stage, self.scheduler, generator)
            x = interpolate_on_path(start, end, sigmas[j])
        target = self.teacher_target(history, x, points, stage, text, scale)
        clips = [*history, x]  # the target is noise-ward, as velocity_target's: Euler steps to lower sigma subtract it
        return Column(clips, target, timestep, stage, column_tokens(clips)), text

    def columns(self, model, samples: list, step: int) -> tuple:
        """(columns, texts) of a micro-batch. With student rollouts on several processes every rank then runs as many
        student passes as the busiest (the extra ones on its first column, discarded): a sharded student gathers its
        weights on each pass, and ranks gathering a different number of times would wait on each other for ever. The
        counts are agreed before any pass, from the plans."""
        plans = [self.plan(sample, step) for sample in samples]
        padding = 0
        if self.rollout_share and dist.is_available() and dist.is_initialized():
            own = sum(self.rollout_passes(plan) for plan in plans)
            busiest = torch.tensor([own], device=self.device)
            dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
            padding = int(busiest) - own
        columns, texts = zip(*(self.column(plan, sample, model) for plan, sample in zip(plans, samples)))
        velocity = self.student_velocity(model, texts[0])
        with torch.no_grad():
            for _ in range(padding):
                velocity(columns[0].clips, columns[0].timestep)
        return columns, texts

    def save(self, folder, state: dict, ema_state) -> None:
        """The student as a checkpoint root whose sampling defaults are its schedule, guidance off (scale 1)."""
        super().save(folder, state, ema_state)
        if self.lora:
            return
        path = folder / SETTINGS_FILE
        settings = json.loads(path.read_text())
        sampling = settings.get("sampling", {}) | {
            "first_frame_steps": list(self.distill["first_frame_steps"]), "video_steps": list(self.distill["video_steps"]),
            "guidance_scale": 1.0, "video_guidance_scale": 1.0, "stage_grid": self.student_scheduler.config.stage_grid}
        if "image_to_video_guidance_scale" in sampling:
            sampling["image_to_video_guidance_scale"] = 1.0
        write_text(path, json.dumps(settings | {"sampling": sampling}, indent=2))
