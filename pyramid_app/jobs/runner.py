"""Running queued jobs: `python -m pyramid_app run-queue QUEUE_FILE` headless, and the studio's queue worker.

Relative `input` and `out` paths in a queue file are read from the queue file's folder, so a queue and its
inputs travel together. A job without `out` is written as `<job id>.mp4` (or .png) next to the queue file.
"""
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from model_core.media_files import read_image, read_video
from model_core.storyboard import Storyboard

from .queue import JobQueue, QueuedJob
from ..options.settings import GenerationOptions, ModelOptions


class Stopped(Exception):
    """A queued job was stopped by the person; it stays `running` in the file and runs again next time."""


def job_prompt(job: QueuedJob):
    """What the pipeline takes as its prompt: the storyboard when the job has one."""
    return Storyboard.coerce(job.storyboard) if job.storyboard else job.prompt


def read_input_file(mode: str, path: Path, spec) -> object:
    """A job's image (image_to_video) or clip (extend_video) at its own size; the pipeline resizes it to `spec`'s."""
    return read_image(path) if mode == "image_to_video" else read_video(path)[0]


def job_output(job: QueuedJob, folder: Path) -> Path:
    if job.out:
        return folder / job.out
    return folder / f"{job.id}{'.png' if job.mode == 'text_to_image' else '.mp4'}"


def seeded_job(queue: JobQueue, job: QueuedJob) -> QueuedJob:
    """The job with a concrete seed recorded in the queue, so a rerun after a crash makes the same video."""
    options = GenerationOptions(**job.options).seeded()
    if options.seed != job.options.get("seed"):
        job = queue.update(job.id, options={**job.options, "seed": options.seed})
    return job


def generate_job(pipe, job: QueuedJob, folder: Path, save: Callable, read_input: Callable = read_input_file,
                 **call_options) -> Path:
    """Run one job on a loaded pipeline and write its output; `read_input(mode, path, spec)` decodes its input file,
    `call_options` go to the pipeline (callback, ...)."""
    options = GenerationOptions(**job.options)
    inputs = () if job.input is None else (read_input(job.mode, folder / job.input, pipe.spec),)
    result = getattr(pipe, job.mode)(*inputs, job_prompt(job),
                                     **options.to_pipeline_kwargs(job.mode), **call_options)
    return saved_result(result, job, folder, save)


def saved_result(result, job: QueuedJob, folder: Path, save: Callable) -> Path:
    """Write a job's result where the job says; a stopped job raises `Stopped` (after saving what it made)."""
    out = job_output(job, folder)
    if len(result.frames[0]) == 0:
        raise Stopped("stopped before the first frame was finished; nothing was saved")
    out.parent.mkdir(parents=True, exist_ok=True)
    save(result, out)
    if result.interrupted:
        raise Stopped(f"stopped; the frames made so far are in {out}")
    return out


def model_options(job: QueuedJob) -> ModelOptions:
    return ModelOptions(**job.model)


def queued_jobs_from_request(request, folder: Path) -> list:
    """The CLI's checked request (a prompt or a --prompts-file batch) as queue jobs, paths relative to `folder`."""
    options = {name: value for name, value in asdict(request.options).items() if value is not None}
    model = {name: value for name, value in asdict(request.model).items() if value != getattr(ModelOptions, name)}
    source = None if request.source is None else _relative(request.source, folder)
    return [QueuedJob(mode=request.mode, prompt="" if isinstance(job.prompt, Storyboard) else job.prompt,
                      storyboard=job.prompt.to_settings() if isinstance(job.prompt, Storyboard) else None,
                      options=options, model=model, input=source, out=_relative(job.out, folder)) for job in request.jobs]


def _relative(path: Path, folder: Path) -> str:
    path = Path(path).resolve()
    try:
        return str(path.relative_to(folder.resolve()))
    except ValueError:
        return str(path)
