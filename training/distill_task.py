"""Few-step, guidance-free distillation of a Pyramid Flow checkpoint (issue 33) as a training task.

Method: guidance distillation (Meng et al., CVPR 2023) fused with trajectory (step) distillation per pyramid
stage in the manner of progressive distillation (Salimans & Ho, ICLR 2022). The student, initialised from the
teacher, runs one pass per step on the prompt alone; its single Euler step over an interval [sigma_a, sigma_b]
of its own schedule (`distill.first_frame_steps` / `distill.video_steps`, the grid the pipeline samples with)
regresses the teacher's guided Euler steps over the same interval on the teacher's inference grid
(`distill.teacher_first_frame_steps` / `distill.teacher_video_steps`), so the guidance scale is baked in.
The jumps between stages (upsample + renoise, Eq. 15) stay as they are, the points x_{sigma_a} lie on the
stage's coupled path (Eqs. 6, 9-10) and the history is the objective's temporal-pyramid history, built with
the functions the pipeline uses. It needs no sampling loop of its own and one student pass per sample, so it
trains on a CPU; PyramidalWan (Korzhenkov et al., arXiv 2601.04792) distils a pyramid to 2-2-2 steps with
DMD or adversarial losses, the next step for quality beyond this regression.
"""
import json

import torch

from model_core.checkpoints import SETTINGS_FILE
from model_core.pyramid import interpolate_on_path

from .atomic import write_text
from .flow_task import FlowTask
from .models import build_transformer
from .objective import Column, column_tokens, corrupted_history, stage_endpoints, unit_index


def nested_intervals(teacher_steps: int, student_steps: int) -> list:
    """[(first, last)) teacher step indices inside each student step: both grids are the pipeline's stage grid,
    linspace(1, ~0.001, steps) then 0, so the student's last step (to 0) is the teacher's last and the others split
    its rest evenly. That last step changes next to nothing: n student steps make n - 1 real ones (2 steps sample
    like 1; benchmarks/RESULTS.md, issue 33)."""
    if student_steps < 1 or teacher_steps < student_steps or (teacher_steps - 1) % max(student_steps - 1, 1):
        raise ValueError(f"teacher steps ({teacher_steps}) - 1 must be a multiple of student steps ({student_steps}) "
                         "- 1, with at least as many teacher steps: e.g. 9 or 10 teacher steps for 2 student steps")
    if student_steps == 1:
        return [(0, teacher_steps)]
    per = (teacher_steps - 1) // (student_steps - 1)
    return [(j * per, (j + 1) * per) for j in range(student_steps - 1)] + [(teacher_steps - 1, teacher_steps)]


class DistillTask(FlowTask):
    """Trains a few-step, guidance-free student (the task's `model`, initialised from `model.pretrained`)
    against that checkpoint as a frozen teacher."""

    def __init__(self, config: dict, annotations: list, device):
        super().__init__(config, annotations, device)
        self.distill = config["distill"]
        self.teacher = build_transformer({**self.model_config, "lora": None, "gradient_checkpointing": False},
                                         self.base, self.seed).to(device).eval().requires_grad_(False)
        for name in ("first_frame_steps", "video_steps"):  # refused before training, not at the first sample
            for teacher, student in zip(self.distill[f"teacher_{name}"], self.distill[name]):
                nested_intervals(teacher, student)

    def schedule(self, unit: int, stage: int) -> tuple:
        """(student steps, teacher steps, guidance scale) of a stage of the first frame or a later unit."""
        name, scale = ("video_steps", "video_guidance_scale") if unit else ("first_frame_steps", "guidance_scale")
        return self.distill[name][stage], self.distill[f"teacher_{name}"][stage], self.distill[scale]

    def grid(self, steps: int, stage: int) -> tuple:
        """(stage-local sigmas, timesteps) the pipeline steps through with `steps` steps in `stage`."""
        self.scheduler.set_timesteps(steps, stage_index=stage, device=self.device)
        return self.scheduler.sigmas.tolist(), self.scheduler.timesteps.float()

    def guided_velocity(self, clips: list, t, text, scale: float) -> torch.Tensor:
        """The teacher's classifier-free guided velocity (Eq. 17's sampler, as the pipeline computes it)."""
        both = self.empty_text.to(self.device).followed_by(text).without_padding_columns()
        v = self.teacher(sample=[[torch.cat([c, c]) for c in clips]], encoder_hidden_states=both.hidden_states,
                         encoder_attention_mask=both.attention_mask, pooled_projections=both.pooled,
                         timestep=t.reshape(1).expand(2), return_dict=False)[0][0].float()
        unconditional, conditional = v.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    @torch.no_grad()
    def teacher_target(self, clips: list, x, grid: tuple, first: int, last: int, text, scale: float):
        """The velocity whose one Euler step from the teacher's sigma[first] reaches where the teacher's guided
        steps first..last-1 on its `grid` go: (x_b - x_a) / (sigma_b - sigma_a)."""
        sigmas, timesteps = grid
        start = x
        for index in range(first, last):
            v = self.guided_velocity([*clips, x], timesteps[index], text, scale)
            x = x.float() + (sigmas[index + 1] - sigmas[index]) * v
        return (x - start) / (sigmas[last] - sigmas[first])

    def column(self, sample, step: int) -> tuple:
        """One student column (history, x at a student step's start) and its distilled velocity target."""
        choices, generator = self.draw(step, sample.request.slot)
        latents = self.clean_latents(sample)
        stage, unit = choices.stage, unit_index(choices, latents.shape[2])
        history = corrupted_history(latents, choices, generator, self.scheduler.config.stages)
        student_steps, teacher_steps, scale = self.schedule(unit, stage)
        j = min(int(choices.sigma * student_steps), student_steps - 1)  # the student step, uniform
        first, last = nested_intervals(teacher_steps, student_steps)[j]
        student_sigmas, student_timesteps = self.grid(student_steps, stage)
        start, end = stage_endpoints(latents[:, :, unit : unit + 1], stage, self.scheduler, generator)
        x = interpolate_on_path(start, end, student_sigmas[j])
        text = self.text_of(sample, False).to(self.device)
        target = self.teacher_target(history, x, self.grid(teacher_steps, stage), first, last, text, scale)
        clips = [*history, x]  # the target is noise-ward, as velocity_target's: Euler steps to lower sigma subtract it
        return Column(clips, target, float(student_timesteps[j]), stage, column_tokens(clips)), text

    def save(self, folder, state: dict, ema_state) -> None:
        """The student as a checkpoint root whose sampling defaults are its schedule, guidance off (scale 1)."""
        super().save(folder, state, ema_state)
        if self.lora:
            return
        path = folder / SETTINGS_FILE
        settings = json.loads(path.read_text())
        sampling = settings.get("sampling", {}) | {
            "first_frame_steps": list(self.distill["first_frame_steps"]), "video_steps": list(self.distill["video_steps"]),
            "guidance_scale": 1.0, "video_guidance_scale": 1.0}
        if "image_to_video_guidance_scale" in sampling:
            sampling["image_to_video_guidance_scale"] = 1.0
        write_text(path, json.dumps(settings | {"sampling": sampling}, indent=2))
