"""The studio's job queue: "Add to queue" next to Generate, a list with reorder / pause / clear / export / import, and a
worker thread that runs the jobs one after another on the same loaded pipelines and device call as Generate.

Local mode: one queue in the output folder (`queue.json`) that survives a restart and runs on where it stopped.
Hosted mode: each browser session's queue lives in that session's output folder (named by the same keyed hash, so
no other client can reach it), is swept with the outputs, and ends with the server: jobs a stranger left waiting
are not run by the next server, whose key no longer names their folder. `Admission` bounds what strangers queue.
Uploaded images and clips of queued jobs are copied next to the queue, so a job still runs after the upload cache
is gone.
"""
import collections
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from ..jobs.queue import QUEUE_FILE, JobQueue, QueuedJob, new_job_id, run_jobs
from .replies import without_paths
from .sessions import Job, StopFlag, run_on_device
from ..jobs.runner import job_prompt, model_options, saved_result, seeded_job
from ..options.settings import GenerationOptions

INPUTS_FOLDER = "queue-inputs"
QUEUE_FOLDER = "queue"  # in a hosted session's output folder
QUEUE_EXPORT = "queue-export.json"  # beside the queue: what the Export button downloads
QUEUE_HEADERS = ["#", "state", "mode", "prompt", "output"]
SERVER_QUEUE_CAP = 30  # hosted: waiting jobs on the whole server
ADDRESS_QUEUE_CAP = 5  # hosted: waiting jobs from one client address, however many sessions it opens
SUBMISSIONS_PER_MINUTE = 6  # hosted: jobs one client address may add in any 60 s
QUEUED_JOB_MAX_AGE = 3600.0  # hosted: seconds a job may wait; one not started by then fails as expired


class Admission:
    """Hosted limits on queued jobs: a server-wide and a per-address cap on waiting jobs, a submission rate per
    address, and an age after which a waiting job expires (kept in memory: no client address is written to disk)."""

    def __init__(self, server_cap=SERVER_QUEUE_CAP, address_cap=ADDRESS_QUEUE_CAP, per_minute=SUBMISSIONS_PER_MINUTE,
                 max_age=QUEUED_JOB_MAX_AGE, clock=time.monotonic):
        self.server_cap, self.address_cap, self.per_minute, self.max_age = server_cap, address_cap, per_minute, max_age
        self.clock = clock
        self._queued = {}  # job id -> (address, when queued)
        self._submitted = collections.defaultdict(collections.deque)  # address -> times of its recent submissions
        self._lock = threading.Lock()

    def admit(self, address: str, waiting: set, job_id: str) -> None:
        """Record `job_id` from `address`, or refuse it with a sentence; `waiting`: ids of every job now waiting."""
        now = self.clock()
        with self._lock:
            self._queued = {key: value for key, value in self._queued.items() if key in waiting}
            recent = self._submitted[address]
            while recent and now - recent[0] > 60:
                recent.popleft()
            if len(waiting) >= self.server_cap:
                raise ValueError(f"this studio's queue is full ({self.server_cap} jobs waiting); try again later")
            if sum(owner == address for owner, _ in self._queued.values()) >= self.address_cap:
                raise ValueError(f"you already have {self.address_cap} jobs waiting, the most allowed here; "
                                 "wait for them or remove some")
            if len(recent) >= self.per_minute:
                raise ValueError(f"at most {self.per_minute} jobs may be queued a minute; wait a moment")
            recent.append(now)
            self._queued[job_id] = (address, now)

    def check_fresh(self, job_id: str) -> None:
        """Refuse to start a job that waited longer than `max_age`."""
        with self._lock:
            _, queued = self._queued.pop(job_id, (None, self.clock()))
        if self.clock() - queued > self.max_age:
            raise ValueError(f"expired: it waited more than {self.max_age / 60:g} minutes to start")


class StudioQueues:
    """The queue (or queues, one per session) of a studio, and a worker per queue while it has pending jobs.
    `read_input(mode, path, spec)` decodes a job's input file; `session_folder`: hosted mode's per-session output
    folders (None: one local queue in `output_dir`)."""

    def __init__(self, output_dir, pipelines, device_lock: threading.Lock, save: Callable, read_input: Callable,
                 session_folder: Optional[Callable] = None, admission: Optional[Admission] = None):
        self.pipelines = pipelines
        self.read_input = read_input
        self.device_lock = device_lock
        self.save = save
        self.session_folder = session_folder
        self.admission = admission
        self._queues = {}
        self._workers = {}
        self._lock = threading.Lock()
        if session_folder is None:
            self._queues["local"] = JobQueue(Path(output_dir) / QUEUE_FILE)
            if self._queues["local"].next_pending() is not None:
                self.start("local")  # jobs left waiting when the app last stopped

    def queue(self, session: str, keep: bool = False) -> JobQueue:
        """The session's queue. A hosted session's is kept in memory once it holds a job (or with `keep`): a page
        that only shows its empty queue every 2 s costs the server nothing to remember."""
        key = "local" if self.session_folder is None else session
        with self._lock:
            if key in self._queues:
                return self._queues[key]
            queue = JobQueue(self.session_folder(session) / QUEUE_FOLDER / QUEUE_FILE)
            if keep or queue.jobs:
                self._queues[key] = queue
            return queue

    def add(self, session: str, mode: str, prompt: str, storyboard, upload, options, model,
            address: str = "local") -> QueuedJob:
        """Queue a job made of the studio's controls, and start running the queue if it is idle."""
        queue, job_id = self.queue(session, keep=True), new_job_id()
        if self.admission is not None:
            self.admission.admit(address, self._waiting(), job_id)
        kept = None
        if upload:
            inputs = queue.path.parent / INPUTS_FOLDER
            inputs.mkdir(parents=True, exist_ok=True)
            kept = inputs / f"{job_id}{Path(upload).suffix.lower()}"
            shutil.copyfile(upload, kept)
        job = queue.add(QueuedJob(
            mode=mode, prompt=prompt or "", storyboard=storyboard, id=job_id,
            options={k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items() if v is not None},
            model={k: v for k, v in asdict(model).items() if v is not None},
            input=None if kept is None else str(kept.relative_to(queue.path.parent))))
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

    def _waiting(self) -> set:
        with self._lock:
            queues = list(self._queues.values())
        return {job.id for queue in queues for job in queue.jobs if job.state == "pending"}

    def _work(self, queue: JobQueue) -> None:
        folder = queue.path.parent

        def run(job):
            if self.admission is not None:
                self.admission.check_fresh(job.id)
            job = seeded_job(queue, job)
            model = model_options(job)
            pipe = self.pipelines.get(model)  # loaded before the device call, as Generate does
            with self.device_lock:
                condition = None if job.input is None else self.read_input(job.mode, folder / job.input, pipe.spec)
                *_, result = run_on_device(self.pipelines, model, Job(job.mode, job_prompt(job), condition,
                                                                      GenerationOptions(**job.options)), StopFlag())
                return saved_result(result, job, folder, self.save)

        run_jobs(queue, run, (Exception,))  # in the studio any failure is the job's: it is listed, the rest go on


def queue_rows(queue: JobQueue, describe: Callable = lambda path: Path(path).name) -> list:
    """The queue as table rows: position, state, mode, prompt (or storyboard prompts), and what a finished job made
    (`describe(output path)`) or why it failed."""
    rows = []
    for position, job in enumerate(queue.jobs, start=1):
        shown = without_paths(job.error) if job.state == "failed" else describe(job.output) if job.output else ""
        rows.append([position, job.state, job.mode.replace("_", " "), job.text, shown])
    return rows


def queue_badge(queue: JobQueue) -> str:
    """The queue panel's title with what the queue holds, e.g. 'Queue: 1 running · 2 waiting (paused) · 3 done'."""
    counts = queue.counts()
    parts = [f"{counts[state]} {word}" for state, word in (("running", "running"), ("pending", "waiting"),
                                                            ("done", "done"), ("failed", "failed")) if counts[state]]
    if queue.paused and counts["pending"]:
        parts[1 if counts["running"] else 0] += " (paused)"
    return f"Queue: {' · '.join(parts)}" if parts else "Queue"


def job_id_at(queue: JobQueue, position) -> str:
    """The id of the job at 1-based `position` in the list, with a sentence when there is none."""
    try:
        index = int(position) - 1
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(queue.jobs):
        raise ValueError(f"pick a job by its # in the list (1 to {len(queue.jobs)}); got {position!r}")
    return queue.jobs[index].id
