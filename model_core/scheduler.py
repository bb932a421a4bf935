"""PyramidFlowScheduler: stage windows, per-stage timesteps and the Euler step (Sec. 3.2, Appendix A)."""
import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .checkpoints import STAGE_GRIDS


@dataclass(frozen=True)
class StageWindow:
    """One stage of the piecewise flow, in noise levels sigma = 1 - t (paper's t: 1 = data)."""

    stage: int
    original_start_sigma: float  # where the uniform partition puts the start
    start_sigma: float  # corrected start after the jump renoise (Eqs. 25-26)
    end_sigma: float
    timestep_start: float  # global [0, num_train_timesteps] timestep at stage-local sigma 1
    timestep_end: float  # ... at stage-local sigma 0

    @property
    def start_signal(self) -> float:
        return 1.0 - self.start_sigma

    @property
    def end_signal(self) -> float:
        return 1.0 - self.end_sigma

    def timestep(self, local_sigma):
        """Global timestep the transformer receives at a stage-local noise level in [0, 1]."""
        return self.timestep_end + (self.timestep_start - self.timestep_end) * local_sigma

    def global_sigma(self, local_sigma):
        """Noise level on the stage's own resolution path at a stage-local noise level."""
        return self.end_sigma + (self.start_sigma - self.end_sigma) * local_sigma


def corrected_start_signal(end_signal_before: float, gamma: float) -> float:
    """s_k from e_{k+1} by inverting Eq. 25 (gamma = |correlation|): s = e / (sqrt(1 + 1/gamma)(1 - e) + e)."""
    return end_signal_before / (math.sqrt(1 + 1 / gamma) * (1 - end_signal_before) + end_signal_before)


class PyramidFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler scheduler over the K stages of a pyramidal flow.

    `set_timesteps(n, stage_index=k)` exposes `.timesteps` on the global [0, 1000] scale (what the
    transformer receives) and `.sigmas` stage-local. `stage_grid` places a stage's n steps: "official" as the
    authors' sampler, linspace(1, 1/num_train_timesteps, n) then 0 (its last step, from 0.001 to 0, changes next to
    nothing: n steps act as n - 1), or "trailing", n equal steps from 1 to 0 (what few-step models are distilled on).
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        stages: int = 3,
        stage_range: Optional[list] = None,
        gamma: float = 1.0 / 3.0,
        stage_grid: str = "official",
    ):
        stage_range = list(stage_range) if stage_range is not None else [i / stages for i in range(stages + 1)]
        if len(stage_range) != stages + 1 or stage_range[0] != 0 or stage_range[-1] != 1:
            raise ValueError(f"stage_range must be {stages + 1} increasing values from 0 to 1; got {stage_range}")
        if not 0 < gamma <= 1 / 3:
            raise ValueError(f"gamma (|block-noise correlation|) must lie in (0, 1/3]; got {gamma}")
        if stage_grid not in STAGE_GRIDS:
            raise ValueError(f"stage_grid must be one of {', '.join(STAGE_GRIDS)}; got {stage_grid!r}")
        self.register_to_config(stage_range=stage_range)
        self.windows = self._stage_windows(num_train_timesteps, shift, stage_range, gamma)
        self.timesteps = None
        self.sigmas = None
        self.stage_index = None
        self._step_index = None
        self._begin_index = None
        self._sigma_deltas = None

    @staticmethod
    def _train_sigmas(num_train_timesteps: int, shift: float) -> torch.Tensor:
        """The training noise grid (num_train_timesteps .. 1) / num_train_timesteps, float32, shifted."""
        grid = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
        return shift * grid / (1 + (shift - 1) * grid)

    def _stage_windows(self, num_train_timesteps, shift, stage_range, gamma) -> list:
        """Stage windows with corrected starts (Eqs. 25-26); the global timestep axis is split in
        proportion to each stage's corrected flow distance."""
        grid = self._train_sigmas(num_train_timesteps, shift)
        starts, originals, ends = [], [], []
        for k in range(len(stage_range) - 1):
            original = grid[int(stage_range[k] * num_train_timesteps)].item()
            end_index = int(stage_range[k + 1] * num_train_timesteps)
            end = grid[end_index].item() if end_index < num_train_timesteps else 0.0
            start = original if k == 0 else 1 - corrected_start_signal(1 - original, gamma)
            originals.append(original)
            starts.append(start)
            ends.append(end)
        distances = np.cumsum([0.0] + [s - e for s, e in zip(starts, ends)])
        ratios = distances / distances[-1]
        train_timesteps = grid * num_train_timesteps
        last = num_train_timesteps - 1
        return [
            StageWindow(
                stage=k,
                original_start_sigma=originals[k],
                start_sigma=starts[k],
                end_sigma=ends[k],
                timestep_start=train_timesteps[int(ratios[k] * num_train_timesteps)].item(),
                timestep_end=train_timesteps[min(int(ratios[k + 1] * num_train_timesteps), last)].item(),
            )
            for k in range(len(starts))
        ]

    def _check_stage(self, stage_index):
        if not isinstance(stage_index, (int, np.integer)) or not 0 <= stage_index < self.config.stages:
            raise ValueError(f"stage_index must be an integer in 0..{self.config.stages - 1}; got {stage_index!r}")

    def renoise_coefficients(self, stage_index: int):
        """(scale, noise_std) of the jump into stage k > 0 (Eqs. 13, 25): scale = s_k / e_{k+1},
        noise_std = (1 - s_k) / sqrt(1 + gamma)."""
        self._check_stage(stage_index)
        if stage_index == 0:
            raise ValueError("stage 0 starts from noise; renoising applies to stages 1..{}".format(self.config.stages - 1))
        window, before = self.windows[stage_index], self.windows[stage_index - 1]
        scale = window.start_signal / before.end_signal
        noise_std = (1 - window.start_signal) / math.sqrt(1 + self.config.gamma)
        return scale, noise_std

    def _last_train_timestep(self, window: StageWindow) -> float:
        """The stage's smallest training timestep on the official float32 grid: element N-1 of an (N+1)-point
        float32 linspace from the stage's first to its last global timestep (N = num_train_timesteps)."""
        n = self.config.num_train_timesteps
        grid = np.linspace(np.float32(window.timestep_start), np.float32(window.timestep_end), n + 1, dtype=np.float32)
        return float(grid[n - 1])

    def set_timesteps(self, num_inference_steps: int, stage_index: int = 0, device: Union[str, torch.device] = None):
        """The stage-local sigmas of `num_inference_steps` steps on the scheduler's `stage_grid`, and their global
        timesteps; the official grid equals the authors' implementation bit for bit."""
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
        self._check_stage(stage_index)
        n = self.config.num_train_timesteps
        window = self.windows[stage_index]
        if self.config.stage_grid == "trailing":
            local = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
            timesteps = window.timestep(local)
        else:
            timesteps = np.linspace(window.timestep_start, self._last_train_timestep(window), num_inference_steps)
            local = np.linspace(1.0, np.linspace(1.0, 0.0, n + 1)[n - 1], num_inference_steps)
        dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64  # MPS has no float64
        sigmas = np.append(local, 0.0).astype(np.float32 if dtype == torch.float32 else np.float64)
        self.timesteps = torch.from_numpy(timesteps).to(device, dtype)
        self.sigmas = torch.from_numpy(sigmas).to(device, dtype)
        self._sigma_deltas = np.diff(sigmas).tolist()  # sigma_next - sigma in the sigmas' dtype, kept on the host
        self.num_inference_steps = num_inference_steps
        self.stage_index = stage_index
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """The index of the first step the caller takes (diffusers' convention, called after `set_timesteps`): the
        first `step` then need not look its timestep up in the schedule, which reads a value back from the device."""
        self._begin_index = begin_index

    def _index_of(self, timestep) -> int:
        matches = (self.timesteps - torch.as_tensor(timestep, dtype=self.timesteps.dtype).reshape(-1)[0]).abs() < 1e-4
        hits = matches.nonzero()
        if len(hits) == 0:
            raise ValueError(f"timestep {float(torch.as_tensor(timestep).reshape(-1)[0])} is not in this stage's schedule")
        return int(hits[0])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """Euler step on the stage-local sigmas: x <- x + (sigma_next - sigma) v, computed in float32."""
        if self.sigmas is None:
            raise ValueError("call set_timesteps(num_inference_steps, stage_index) before step()")
        if self._step_index is None:
            self._step_index = self._index_of(timestep) if self._begin_index is None else self._begin_index
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps of stage {self.stage_index} are done")
        prev = sample.float() + self._sigma_deltas[self._step_index] * model_output.float()
        self._step_index += 1
        prev = prev.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self):
        return self.config.num_train_timesteps
