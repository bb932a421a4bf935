"""A queue of generation jobs that outlives the app: saved atomically as one JSON file after every change.

Each job keeps everything needed to run it again (mode, prompt or storyboard, generation and model options,
the input image or clip as a file, where to write the output) and its state: pending, running, done or failed.
A job found `running` when a queue is loaded was cut off by a crash and is pending again; done jobs are never
redone. The studio keeps one queue per session in its output folder; `python -m pyramid_app run-queue FILE`
runs a saved one headless.
"""
import errno
import json
import logging
import os
import secrets
import tempfile
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional

QUEUE_FORMAT = 1
QUEUE_FILE = "queue.json"
STATES = ("pending", "running", "done", "failed")
MODES = ("text_to_video", "image_to_video", "extend_video", "text_to_image")
LOG = logging.getLogger(__name__)


def new_job_id() -> str:
    return secrets.token_hex(4)


@dataclass(frozen=True)
class QueuedJob:
    """One generation to run: `options` and `model` hold GenerationOptions / ModelOptions fields by name."""

    mode: str
    prompt: str = ""
    storyboard: Optional[dict] = None  # a Storyboard's settings form; replaces `prompt` when given
    options: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    input: Optional[str] = None  # the image (image_to_video) or clip (extend_video) file
    out: Optional[str] = None  # where to write; None lets the runner choose a name in its output folder
    id: str = field(default_factory=new_job_id)
    state: str = "pending"
    output: Optional[str] = None  # the file written, once done
    error: Optional[str] = None  # why it failed

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"a queued job's mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.state not in STATES:
            raise ValueError(f"a queued job's state must be one of {', '.join(STATES)}; got {self.state!r}")
        if self.mode in ("image_to_video", "extend_video") and not self.input:
            raise ValueError(f"a queued {self.mode} job needs its input file")

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "QueuedJob":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown job field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    @property
    def text(self) -> str:
        """The prompt, or the storyboard's prompts in order."""
        return " → ".join(s["prompt"] for s in self.storyboard["segments"]) if self.storyboard else self.prompt


class JobQueue:
    """Jobs in running order, saved to `path` after every change."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self.jobs, self.paused = read_queue(self.path) if self.path.is_file() else ([], False)
        self.jobs = [replace(job, state="pending") if job.state == "running" else job for job in self.jobs]

    # --- changes (each saved at once) -----------------------------------------------------------

    def add(self, job: QueuedJob) -> QueuedJob:
        with self._lock:
            if any(j.id == job.id for j in self.jobs):
                job = replace(job, id=new_job_id())
            self.jobs.append(job)
            self._save()
            return job

    def move(self, job_id: str, offset: int) -> None:
        """Move a job `offset` places later (negative: earlier), within the list's ends."""
        with self._lock:
            index = self._index(job_id)
            job = self.jobs.pop(index)
            self.jobs.insert(min(max(index + offset, 0), len(self.jobs)), job)
            self._save()

    def remove(self, job_id: str) -> None:
        with self._lock:
            index = self._index(job_id)
            if self.jobs[index].state == "running":
                raise ValueError("that job is running; stop it before removing it")
            del self.jobs[index]
            self._save()

    def clear(self, states=("done", "failed")) -> int:
        """Drop the jobs in `states` (default: the finished ones); returns how many went."""
        with self._lock:
            kept = [job for job in self.jobs if job.state not in states or job.state == "running"]
            dropped = len(self.jobs) - len(kept)
            self.jobs = kept
            self._save()
            return dropped

    def set_paused(self, paused: bool) -> None:
        """A paused queue finishes the running job and starts no other."""
        with self._lock:
            self.paused = bool(paused)
            self._save()

    def update(self, job_id: str, **changes) -> QueuedJob:
        with self._lock:
            index = self._index(job_id)
            self.jobs[index] = replace(self.jobs[index], **changes)
            self._save()
            return self.jobs[index]

    def merge(self, path, inputs_within=None) -> int:
        """Append the jobs of an exported queue file as pending ones; returns how many came. With `inputs_within`
        (the studio) every job's input file must lie in that folder and its output name is this queue's choice."""
        jobs, _ = read_queue(Path(path))
        if inputs_within is not None:
            jobs = [_kept_within(job, number, self.path.parent, Path(inputs_within))
                    for number, job in enumerate(jobs, start=1)]
        with self._lock:
            for job in jobs:
                self.add(replace(job, state="pending", output=None, error=None))
            return len(jobs)

    def export(self, path) -> Path:
        """This queue as one file (the format `run-queue` reads)."""
        with self._lock:
            return write_queue(Path(path), self.jobs, self.paused)

    # --- reading ----------------------------------------------------------------------------------

    def next_pending(self) -> Optional[QueuedJob]:
        with self._lock:
            if self.paused:
                return None
            return next((job for job in self.jobs if job.state == "pending"), None)

    def counts(self) -> dict:
        with self._lock:
            return {state: sum(job.state == state for job in self.jobs) for state in STATES}

    def _index(self, job_id: str) -> int:
        for index, job in enumerate(self.jobs):
            if job.id == job_id:
                return index
        raise ValueError(f"no job {job_id!r} in the queue")

    def _save(self) -> None:
        """Write the queue; on a full disk the queue goes on in memory (its states stay right) and says so once."""
        try:
            write_queue(self.path, self.jobs, self.paused)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            LOG.warning("the queue %s could not be saved (disk full); it goes on in memory", self.path.name)


def _kept_within(job: QueuedJob, number: int, folder: Path, inputs: Path) -> QueuedJob:
    """`job` without an output name, refused unless its input (if any) is a file in `inputs`."""
    if job.input is not None:
        path = (folder / job.input).resolve()
        if not (path.is_relative_to(inputs.resolve()) and path.is_file()):
            raise ValueError(f"job {number} of the imported queue names an input that is not among this queue's "
                             "inputs; add image and clip jobs with their upload instead")
    return replace(job, out=None)


def run_jobs(queue: JobQueue, run: Callable, user_errors: tuple = (ValueError, FileNotFoundError)) -> dict:
    """Run pending jobs in order until none is left or the queue is paused: `run(job)` returns the written file.
    A job failing with one of `user_errors` is marked failed with its sentence and the rest go on; any other
    exception leaves the job `running` in the file (so a restart runs it again) and propagates."""
    while (job := queue.next_pending()) is not None:
        queue.update(job.id, state="running", error=None)
        try:
            output = run(job)
        except user_errors as error:
            queue.update(job.id, state="failed", error=str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
            continue
        queue.update(job.id, state="done", output=str(output))
    return queue.counts()


def read_queue(path: Path) -> tuple:
    """(jobs, paused) from a queue file, with a sentence for anything that is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"no such queue file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a queue file (not JSON: {error})") from None
    if not isinstance(data, dict) or data.get("format") != QUEUE_FORMAT or not isinstance(data.get("jobs"), list):
        raise ValueError(f"{path} is not a queue file of this app (expected format {QUEUE_FORMAT} with a 'jobs' list)")
    jobs = []
    for index, job in enumerate(data["jobs"]):
        if not isinstance(job, dict):
            raise ValueError(f"{path}: job {index + 1} is not an object")
        jobs.append(QueuedJob.from_dict(job, f"{path} job {index + 1}"))
    return jobs, bool(data.get("paused", False))


def write_queue(path: Path, jobs: list, paused: bool = False) -> Path:
    data = {"format": QUEUE_FORMAT, "paused": paused, "jobs": [asdict(job) for job in jobs]}
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=1, ensure_ascii=False)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
