"""The studio's job queue: "Add to queue" next to Generate, a list with reorder / pause / clear / export / import, and a
worker thread that runs the jobs one after another on the same loaded pipelines as Generate.

The queue lives in the output folder (`queue.json`), so it survives a restart of the app; with `per_session`
(hosted mode) each browser session gets its own folder and queue, capped at `cap` waiting jobs. After a restart
every session's waiting jobs run again, into that session's folder; the page a stranger reloads is a new session
and lists none of them, since nothing a client sends may claim another session's queue. Uploaded
images and clips of queued jobs are copied next to the queue, so a job still runs after the upload cache is gone.
"""
import shutil
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from .job_queue import QUEUE_FILE, JobQueue, QueuedJob, SessionQueues, run_jobs
from .queue_runner import generate_job, model_options, seeded_job

INPUTS_FOLDER = "queue-inputs"
QUEUE_HEADERS = ["#", "state", "mode", "prompt", "output"]


class StudioQueues:
    """The queue (or queues, one per session) of a studio, and a worker per queue while it has pending jobs."""

    def __init__(self, output_dir, pipelines, device_lock: threading.Lock, save: Callable,
                 per_session: bool = False, cap: Optional[int] = None):
        self.output_dir = Path(output_dir)
        self.pipelines = pipelines
        self.device_lock = device_lock
        self.save = save
        self.sessions = SessionQueues(self.output_dir / "queues", cap) if per_session else None
        self.shared = None if per_session else JobQueue(self.output_dir / QUEUE_FILE, cap=cap)
        self._workers = {}
        self._lock = threading.Lock()
        for session in self.sessions.saved() if self.sessions is not None else ["local"]:
            if self.queue(session).next_pending() is not None:
                self.start(session)  # jobs left waiting when the app last stopped

    def queue(self, session: str) -> JobQueue:
        return self.sessions.get(session) if self.sessions is not None else self.shared

    def add(self, session: str, mode: str, prompt: str, storyboard, upload, options, model) -> QueuedJob:
        """Queue a job made of the studio's controls, and start running the queue if it is idle."""
        queue = self.queue(session)
        job = QueuedJob(mode=mode, prompt=prompt or "", storyboard=storyboard,
                        options={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items() if v is not None},
                        model={k: v for k, v in asdict(model).items() if v is not None})
        if upload:
            inputs = queue.path.parent / INPUTS_FOLDER
            inputs.mkdir(parents=True, exist_ok=True)
            kept = inputs / f"{job.id}{Path(upload).suffix}"
            shutil.copyfile(upload, kept)
            job = QueuedJob(**{**asdict(job), "input": str(kept.relative_to(queue.path.parent))})
        job = queue.add(job)
        self.start(session)
        return job

    def start(self, session: str) -> None:
        """Run the session's queue on a worker thread unless one is already running it."""
        queue = self.queue(session)
        with self._lock:
            worker = self._workers.get(queue.path)
            if worker is not None and worker.is_alive():
                return
            worker = threading.Thread(target=self._work, args=(queue,), name="pyramid-queue", daemon=True)
            self._workers[queue.path] = worker
            worker.start()

    def wait(self, session: str, timeout: float = None) -> None:
        """Until the session's worker has finished (tests; the studio polls `rows` instead)."""
        worker = self._workers.get(self.queue(session).path)
        if worker is not None:
            worker.join(timeout)

    def _work(self, queue: JobQueue) -> None:
        folder = queue.path.parent

        def run(job):
            job = seeded_job(queue, job)
            pipe = self.pipelines.get(model_options(job))
            with self.device_lock:
                return generate_job(pipe, job, folder, self.save)

        run_jobs(queue, run, (Exception,))  # in the studio any failure is the job's: it is listed, the rest go on


def queue_rows(queue: JobQueue) -> list:
    """The queue as table rows: position, state, mode, prompt (or storyboard prompts), output file name."""
    rows = []
    for position, job in enumerate(queue.jobs, start=1):
        shown = job.error if job.state == "failed" else Path(job.output).name if job.output else ""
        rows.append([position, job.state, job.mode.replace("_", " "), job.text, shown])
    return rows


def job_id_at(queue: JobQueue, position) -> str:
    """The id of the job at 1-based `position` in the list, with a sentence when there is none."""
    try:
        index = int(position) - 1
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(queue.jobs):
        raise ValueError(f"pick a job by its # in the list (1 to {len(queue.jobs)}); got {position!r}")
    return queue.jobs[index].id
