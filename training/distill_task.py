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
the functions the pipeline uses. It needs no sampling loop of its own and one student pass per sample, so it
trains on a CPU; PyramidalWan (Korzhenkov et al., arXiv 2601.04792) distils a pyramid to 2-2-2 steps with
DMD or adversarial losses, the next step for quality beyond this regression.
"""
import json
from dataclasses import replace

import torch

from model_core.checkpoints import SETTINGS_FILE
from model_core.pyramid import interpolate_on_path
from model_core.scheduler import PyramidFlowScheduler

from .atomic import write_text
from .flow_task import FlowTask
from .models import build_transformer
from .objective import Column, column_tokens, corrupted_history, stage_endpoints, unit_index


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

    def column(self, sample, step: int) -> tuple:
        """One student column (history, x at a student step's start) and its distilled velocity target."""
        choices, generator = self.draw(step, sample.request.slot)
        latents = self.clean_latents(sample)
        unit = unit_index(choices, latents.shape[2])
        student_steps, teacher_steps, scale = self.schedule(unit)
        stage, j = student_step(choices, student_steps)
        choices = replace(choices, stage=stage)
        history = corrupted_history(latents, choices, generator, self.scheduler.config.stages)
        sigmas = self.grid(self.student_scheduler, student_steps[stage], stage)
        points = teacher_points(self.grid(self.scheduler, teacher_steps[stage], stage), sigmas[j], sigmas[j + 1])
        start, end = stage_endpoints(latents[:, :, unit : unit + 1], stage, self.scheduler, generator)
        x = interpolate_on_path(start, end, sigmas[j])
        text = self.text_of(sample, False).to(self.device)
        target = self.teacher_target(history, x, points, stage, text, scale)
        clips = [*history, x]  # the target is noise-ward, as velocity_target's: Euler steps to lower sigma subtract it
        timestep = float(self.student_scheduler.timesteps[j])
        return Column(clips, target, timestep, stage, column_tokens(clips)), text

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
