"""Generation sessions for the studio: loaded pipelines kept warm, a worker per run, Stop per browser session.

`run_job` drives one pipeline call through `generation_events` on a worker thread and yields its progress events as
they come, then the finished (or stopped) `PyramidFlowPipelineOutput`; the caller decides what to show. On a ZeroGPU
Space `generation_events` is the `@spaces.GPU` handler: only picklable job data crosses into its forked worker, and
Stop (a file) and the previews (what it yields) cross back.
"""
import asyncio
import contextlib
import contextvars
import gc
import itertools
import math
import os
import queue
import secrets
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model_core.sampling import Progress
from model_core.storyboard import Storyboard

from ..options.errors import USER_ERRORS
from ..options.settings import GenerationOptions, ModelOptions, model_name, model_source

# ZeroGPU's time budget per request (see `gpu_seconds`): a budget, not a measured speed.
GPU_BASE_SECONDS, GPU_SECONDS_PER_STEP, GPU_MIN_SECONDS, GPU_MAX_SECONDS = 20, 0.5, 60, 300


ABANDONED = "abandoned"
_CACHES = weakref.WeakValueDictionary()  # every PipelineCache of this process, by its key
_CACHE_KEYS = itertools.count()


class PipelineCache:
    """Loaded pipelines keyed by (model, variant, memory options); the oldest is dropped beyond `capacity`.
    Under torchrun, `parallel` is the layout each loaded pipeline splits its generations by.

    A cache pickles as its key: a ZeroGPU worker, forked from this process, unpickles it as its own copy of the same
    cache, with the models loaded before the fork already in it (nothing of a model crosses the pipe)."""

    def __init__(self, capacity: int = 1, parallel=None):
        self.capacity = capacity
        self.parallel = parallel
        self._loaded = OrderedDict()
        self._lock = threading.Lock()
        self.key = next(_CACHE_KEYS)
        _CACHES[self.key] = self

    def __reduce__(self):
        return registered_cache, (self.key,)

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
                self._loaded[key].set_progress_bar_config(disable=True)  # the studio shows progress from callbacks
            pipe = self._loaded[key]
            pipe.use_loras(model.lora)
            pipe.source = model_name(model.model)  # what the outputs' settings record
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


def registered_cache(key: int) -> PipelineCache:
    return _CACHES[key]


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StopFlag:
    """Stop for one generation, seen also by a ZeroGPU worker forked from this process: a file that exists once
    Stop was pressed, and says "abandoned" once nobody waits for the result (it pickles as its path)."""

    def __init__(self):
        self.path = os.path.join(tempfile.gettempdir(), f"pyramid-stop-{secrets.token_hex(8)}")

    def set(self) -> None:
        Path(self.path).touch()

    def abandon(self) -> None:
        Path(self.path).write_text(ABANDONED)

    def is_set(self) -> bool:
        return os.path.exists(self.path)

    def is_abandoned(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            return Path(self.path).read_text() == ABANDONED
        return False

    def clear(self) -> None:
        Path(self.path).unlink(missing_ok=True)


class StopSwitches:
    """One stop flag per browser session, alive while that session's generation runs."""

    def __init__(self):
        self._flags = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> StopFlag:
        with self._lock:
            self._flags[session] = StopFlag()
            return self._flags[session]

    def stop(self, session: str) -> bool:
        """Ask the session's running generation to stop after its current step; False when none runs."""
        with self._lock:
            flag = self._flags.get(session)
        if flag is None:
            return False
        flag.set()
        return True

    def finish(self, session: str) -> None:
        with self._lock:
            flag = self._flags.pop(session, None)
        if flag is not None and not flag.is_abandoned():  # an abandoned run's flag goes when its pipeline ends
            flag.clear()


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


async def run_job(pipelines, model: ModelOptions, job: Job, stop: StopFlag, device_lock: threading.Lock):
    """Yield the pipeline's progress (`Progress` after each step, `UnitPreview` after each unit), then its result.

    `generation_events` runs on a worker thread holding `device_lock`, so a device never runs two generations at
    once; waiting for it never blocks the event loop. The thread carries the caller's context, so on ZeroGPU the
    Gradio request (the visitor's quota) reaches `spaces`. `stop` ends the run after the current step and keeps the
    finished units. When the consumer goes away early (a cancelled request), this returns at once and the pipeline
    ends after its current transformer step, keeping nothing.
    """
    loop = asyncio.get_running_loop()
    events = asyncio.Queue()
    abandoned = threading.Event()

    def emit(item):
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(events.put_nowait, item)

    def work():
        with device_lock:
            if abandoned.is_set():
                return
            stream = run_on_device(pipelines, model, job, stop)
            try:
                for event in stream:
                    emit(event)
                    if abandoned.is_set():
                        return
            except BaseException as error:  # handed to the consumer, which re-raises it
                emit(_Failed(error))
            finally:
                stream.close()

    threading.Thread(target=contextvars.copy_context().run, args=(work,), name=f"pyramid-{job.mode}",
                     daemon=True).start()
    finished = False
    try:
        while not finished:
            event = await events.get()
            if isinstance(event, _Failed):
                raise event.error
            finished = not isinstance(event, (Progress, UnitPreview))
            yield event
    finally:
        abandoned.set()
        if not finished:
            stop.abandon()


def generation_events(pipelines, model: ModelOptions, job: Job, stop: StopFlag):
    """Yield `Progress` after each step, `UnitPreview` after each unit, then the result: the handler that holds the
    device (on a ZeroGPU Space, a forked GPU worker; see `run_on_device`). Its arguments and what it yields are
    plain picklable data; the pipeline comes from `pipelines` in this process and runs on a thread of it."""
    pipe = pipelines.get(model)
    events, abandoned = queue.Queue(), threading.Event()

    def on_step_end(pipe, step_index, timestep, callback_kwargs):
        if abandoned.is_set() or stop.is_abandoned():
            raise _Abandoned
        progress = pipe.progress
        events.put(UnitPreview(progress, pipe.unit_preview(callback_kwargs["video_latents"])) if progress.kind == "unit"
                   else progress)
        pipe._interrupt = stop.is_set()
        return {}

    def work():
        try:
            events.put(_on_host(_generate(pipe, job, on_step_end)))
        except _Abandoned:
            events.put(None)
        except BaseException as error:
            events.put(_Failed(error))

    worker = threading.Thread(target=work, name=f"pyramid-{job.mode}-device", daemon=True)
    worker.start()
    try:
        while (event := events.get()) is not None:
            if isinstance(event, _Failed):
                raise event.error
            yield event
            if not isinstance(event, (Progress, UnitPreview)):
                return
    finally:
        abandoned.set()
        worker.join()  # the device is free once this returns
        stop.clear()


def _on_host(result):
    """The result with its latents in host memory, as it leaves a GPU worker."""
    if getattr(result, "latents", None) is not None:
        result.latents = result.latents.cpu()
    return result


def _generate(pipe, job: Job, on_step_end):
    """The pipeline call itself."""
    inputs = () if job.condition is None else (job.condition,)
    return getattr(pipe, job.mode)(*inputs, job.prompt, **job.options.to_pipeline_kwargs(job.mode),
                                   callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["video_latents"])


def gpu_seconds(pipelines, model: ModelOptions, job: Job, *rest) -> int:
    """The GPU time to ask ZeroGPU for: a budget of GPU_SECONDS_PER_STEP per transformer step of this request
    (units x steps per unit) plus GPU_BASE_SECONDS, clipped to ZeroGPU's range. A budget, not a measurement."""
    pipe = pipelines.get(model)
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
    """On a Hugging Face ZeroGPU Space (`spaces` installed), `function` holds a GPU for `gpu_seconds` in a worker
    forked from this process; elsewhere (and where `spaces` finds no ZeroGPU) it runs as it is. The model is loaded
    before, outside the GPU-holding call."""
    try:
        import spaces
    except ImportError:
        return function
    return spaces.GPU(duration=gpu_seconds)(function)


run_on_device = _on_gpu(generation_events)


def progress_text(event) -> str:
    position = f"unit {event.unit + 1}/{event.num_units}"
    if event.kind == "unit":
        return f"{position} done"
    return f"{position} · stage {event.stage + 1} · step {event.step + 1}/{event.num_steps}"
