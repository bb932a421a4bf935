"""Generation sessions for the studio: loaded pipelines kept warm, a worker per run, Stop per browser session.

`run_job` drives one pipeline call on a worker thread and yields its progress events as they come,
then the finished (or stopped) `PyramidFlowPipelineOutput`; the caller decides what to show.
"""
import asyncio
import contextlib
import gc
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch

from model_core.sampling import Progress
from model_core.storyboard import Storyboard

from .cli import USER_ERRORS
from .settings import GenerationOptions, ModelOptions, model_source

# ZeroGPU's time budget per request (see `gpu_seconds`): a budget, not a measured speed.
GPU_BASE_SECONDS, GPU_SECONDS_PER_STEP, GPU_MIN_SECONDS, GPU_MAX_SECONDS = 20, 0.5, 60, 300


class PipelineCache:
    """Loaded pipelines keyed by (model, variant, memory options); the oldest is dropped beyond `capacity`.
    Under torchrun, `parallel` is the layout each loaded pipeline splits its generations by."""

    def __init__(self, capacity: int = 1, parallel=None):
        self.capacity = capacity
        self.parallel = parallel
        self._loaded = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: ModelOptions, tqdm_class=None):
        """The loaded pipeline for `model` with exactly its LoRAs active (a change of LoRAs does not reload it)."""
        key = replace(model, model=model_source(model.model), lora=())
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
            else:
                while len(self._loaded) >= self.capacity:
                    self._loaded.popitem(last=False)
                    _release_memory()
                from model_core import PyramidFlowPipeline

                self._loaded[key] = PyramidFlowPipeline.from_pretrained(key.model, **key.to_load_kwargs(),
                                                                        tqdm_class=tqdm_class, parallel=self.parallel)
            pipe = self._loaded[key]
            pipe.use_loras(model.lora)
            return pipe

    def warm_up(self, model: ModelOptions) -> threading.Thread:
        """Start loading `model` in the background; a generation asking for it meanwhile waits for it.
        A failure is left for that generation to report, since it loads again and says what is wrong."""

        def load():
            with contextlib.suppress(*USER_ERRORS, OSError):
                self.get(model)

        thread = threading.Thread(target=load, name="pyramid-warm-up", daemon=True)
        thread.start()
        return thread


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StopSwitches:
    """One stop event per browser session, alive while that session's generation runs."""

    def __init__(self):
        self._events = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        with self._lock:
            self._events[session] = threading.Event()
            return self._events[session]

    def stop(self, session: str) -> bool:
        """Ask the session's running generation to stop after its current step; False when none runs."""
        with self._lock:
            event = self._events.get(session)
        if event is None:
            return False
        event.set()
        return True

    def finish(self, session: str) -> None:
        with self._lock:
            self._events.pop(session, None)


@dataclass(frozen=True)
class Job:
    """One pipeline call: `mode` names the method, `condition` is the image or clip (None for text modes)."""

    mode: str
    prompt: str
    condition: np.ndarray
    options: GenerationOptions


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@dataclass(frozen=True)
class UnitPreview:
    """A finished unit: its progress and its frames (uint8 [t, H, W, 3])."""

    progress: object
    frames: np.ndarray


class _Abandoned(Exception):
    """Raised inside the pipeline's step callback once nobody waits for the result (the request was cancelled)."""


async def run_job(pipe, job: Job, stop: threading.Event, device_lock: threading.Lock):
    """Yield the pipeline's progress (`Progress` after each step, `UnitPreview` after each unit), then its result.

    The pipeline runs on a worker thread holding `device_lock`, so a device never runs two generations at once;
    waiting for it never blocks the event loop. `stop` ends the run after the current step and keeps the finished
    units. When the consumer goes away early (a cancelled request), this returns at once and the worker ends
    after its current transformer step, keeping nothing.
    """
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    abandoned = threading.Event()

    def emit(item):
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, item)

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        if abandoned.is_set():
            raise _Abandoned
        progress = pipe.progress
        emit(UnitPreview(progress, pipe.unit_preview(callback_kwargs["video_latents"])) if progress.kind == "unit"
             else progress)
        pipe._interrupt = stop.is_set()
        return {}

    def work():
        with device_lock:
            if abandoned.is_set():
                return
            try:
                emit(run_on_device(pipe, job, on_step_end))
            except _Abandoned:
                return
            except BaseException as error:  # handed to the consumer, which re-raises it
                emit(_Failed(error))

    threading.Thread(target=work, name=f"pyramid-{job.mode}", daemon=True).start()
    try:
        while True:
            event = await events.get()
            if isinstance(event, _Failed):
                raise event.error
            yield event
            if not isinstance(event, (Progress, UnitPreview)):
                return
    finally:
        abandoned.set()
        stop.set()


def _generate(pipe, job: Job, on_step_end):
    """The pipeline call itself: on a ZeroGPU Space, the only part that holds a GPU (see `run_on_device`)."""
    inputs = () if job.condition is None else (job.condition,)
    return getattr(pipe, job.mode)(*inputs, job.prompt, **job.options.to_pipeline_kwargs(job.mode),
                                   callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["video_latents"])


def gpu_seconds(pipe, job: Job, *rest) -> int:
    """The GPU time to ask ZeroGPU for: a budget of GPU_SECONDS_PER_STEP per transformer step of this request
    (units x steps per unit) plus GPU_BASE_SECONDS, clipped to ZeroGPU's range. A budget, not a measurement."""
    spec = pipe.spec
    frames = 1 if job.mode == "text_to_image" else job.options.num_frames or spec.max_frames
    if isinstance(job.prompt, Storyboard):  # its seconds set the length
        frames = job.prompt.num_frames(spec.fps, spec.frames_per_latent, continues=job.mode == "extend_video")
    units = max(1, math.ceil(frames / spec.frames_per_latent))
    first = sum(job.options.first_frame_steps or pipe.family.sampling.first_frame_steps)
    later = sum(job.options.video_steps or pipe.family.sampling.video_steps)
    seconds = GPU_BASE_SECONDS + GPU_SECONDS_PER_STEP * (first + (units - 1) * later)
    return int(min(GPU_MAX_SECONDS, max(GPU_MIN_SECONDS, seconds)))


def _on_gpu(function):
    """On a Hugging Face ZeroGPU Space (`spaces` installed), `function` holds a GPU for `gpu_seconds`;
    elsewhere it runs as it is. The model is loaded before, outside the GPU-holding call."""
    try:
        import spaces
    except ImportError:
        return function
    return spaces.GPU(duration=gpu_seconds)(function)


run_on_device = _on_gpu(_generate)


def progress_text(event) -> str:
    position = f"unit {event.unit + 1}/{event.num_units}"
    if event.kind == "unit":
        return f"{position} done"
    return f"{position} · stage {event.stage + 1} · step {event.step + 1}/{event.num_steps}"
