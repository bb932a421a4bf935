"""The job queue: saved after every change, survives a restart, resumes after a crash without redoing finished jobs."""
import json

import pytest

from model_core.media_files import read_metadata, read_video
from pyramid_app import cli
from pyramid_app.jobs.queue import JobQueue, QueuedJob, read_queue, run_jobs
from tiny_checkpoint import build_tiny_checkpoint

FAST = ["--first-frame-steps", "1,1,1", "--video-steps", "1,1,1", "--guidance", 1, "--video-guidance", 1, "--quiet"]


def job(prompt, **fields):
    return QueuedJob(mode="text_to_video", prompt=prompt, options={"num_frames": 9}, **fields)


def prompts(queue):
    return [j.prompt for j in queue.jobs]


def test_every_change_is_saved_and_a_new_queue_object_reads_it_back(tmp_path):
    path = tmp_path / "out" / "queue.json"
    queue = JobQueue(path)
    first, second, third = (queue.add(job(p)) for p in ("a", "b", "c"))
    queue.move(third.id, -2)
    queue.move(first.id, 5)  # past the end: last
    queue.set_paused(True)
    queue.update(second.id, state="done", output="x.mp4")
    restarted = JobQueue(path)
    assert prompts(restarted) == ["c", "b", "a"] and restarted.paused
    assert restarted.jobs[1].state == "done" and restarted.jobs[1].output == "x.mp4"
    assert restarted.next_pending() is None  # paused
    restarted.set_paused(False)
    assert restarted.next_pending().prompt == "c"
    assert restarted.clear() == 1 and prompts(JobQueue(path)) == ["c", "a"]
    restarted.remove(first.id)
    assert prompts(JobQueue(path)) == ["c"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["queue.json"]  # no temporary files left


def test_a_job_running_when_the_app_died_is_pending_after_a_restart(tmp_path):
    path = tmp_path / "queue.json"
    queue = JobQueue(path)
    running = queue.add(job("a"))
    queue.update(running.id, state="running")
    assert JobQueue(path).jobs[0].state == "pending"


def test_export_and_import_one_file(tmp_path):
    queue = JobQueue(tmp_path / "a" / "queue.json")
    done = queue.add(job("a"))
    queue.add(job("b"))
    queue.update(done.id, state="done", output="a.mp4")
    exported = queue.export(tmp_path / "shared.json")
    other = JobQueue(tmp_path / "b" / "queue.json")
    assert other.merge(exported) == 2
    assert [(j.prompt, j.state, j.output) for j in other.jobs] == [("a", "pending", None), ("b", "pending", None)]


@pytest.mark.parametrize("text,message", [
    ("not json", "not JSON"),
    ('{"jobs": []}', "not a queue file of this app"),
    ('{"format": 1, "jobs": [{"mode": "text_to_video", "colour": "red"}]}', "unknown job field\\(s\\) colour"),
    ('{"format": 1, "jobs": [{"mode": "dance"}]}', "mode must be one of"),
    ('{"format": 1, "jobs": [{"mode": "image_to_video"}]}', "needs its input file"),
])
def test_bad_queue_files_say_what_is_wrong(tmp_path, text, message):
    (tmp_path / "q.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_queue(tmp_path / "q.json")


def test_run_jobs_marks_failures_and_goes_on(tmp_path):
    queue = JobQueue(tmp_path / "queue.json")
    for p in ("a", "bad", "c"):
        queue.add(job(p))

    def run(j):
        if j.prompt == "bad":
            raise ValueError("cannot draw that\nmore detail")
        return tmp_path / f"{j.prompt}.mp4"

    assert run_jobs(queue, run) == {"pending": 0, "running": 0, "done": 2, "failed": 1}
    assert [(j.state, j.error) for j in JobQueue(queue.path).jobs] == [
        ("done", None), ("failed", "cannot draw that"), ("done", None)]


# --- the command line: --save-queue and run-queue on the tiny checkpoint ------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "miniflux")


def test_save_queue_then_run_queue_resumes_after_a_crash(tiny_model, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompts.txt").write_text("a red ball\na blue cube\na green cone\n")
    queue_file = tmp_path / "night" / "queue.json"
    code = cli.main(["generate", "--model", str(tiny_model), "--prompts-file", str(tmp_path / "prompts.txt"),
                     "--out-dir", str(tmp_path / "night" / "clips"), "--num-frames", "9",
                     "--save-queue", str(queue_file), *map(str, FAST)])
    assert code == 0 and not (tmp_path / "night" / "clips").exists()  # nothing generated yet
    saved = json.loads(queue_file.read_text())["jobs"]
    assert [(j["prompt"], j["out"], j["state"]) for j in saved] == [
        ("a red ball", "clips/0000.mp4", "pending"), ("a blue cube", "clips/0001.mp4", "pending"),
        ("a green cone", "clips/0002.mp4", "pending")]
    assert saved[0]["options"]["first_frame_steps"] == [1, 1, 1] and saved[0]["model"]["model"] == str(tiny_model)

    from model_core import PyramidFlowPipeline

    generate, made = PyramidFlowPipeline.text_to_video, []

    def crashes_on_blue(self, prompt, **options):
        made.append(prompt)
        if "blue" in prompt:
            raise RuntimeError("the machine lost power")
        return generate(self, prompt, **options)

    monkeypatch.setattr(PyramidFlowPipeline, "text_to_video", crashes_on_blue)
    with pytest.raises(RuntimeError, match="lost power"):
        cli.run_queue(queue_file, quiet=True)
    assert [j.state for j in read_queue(queue_file)[0]] == ["done", "running", "pending"]
    first_seed = read_metadata(tmp_path / "night" / "clips" / "0000.mp4")["seed"]

    monkeypatch.setattr(PyramidFlowPipeline, "text_to_video", generate)
    made.clear()
    capsys.readouterr()
    assert cli.main(["run-queue", str(queue_file), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / "night" / "clips" / f"000{i}.mp4") for i in (1, 2)]
    jobs = read_queue(queue_file)[0]
    assert [j.state for j in jobs] == ["done"] * 3
    assert read_metadata(tmp_path / "night" / "clips" / "0000.mp4")["seed"] == first_seed  # not redone
    assert [read_metadata(tmp_path / "night" / "clips" / f"000{i}.mp4")["prompt"] for i in range(3)] == [
        "a red ball", "a blue cube", "a green cone"]
    assert [read_metadata(tmp_path / "night" / "clips" / f"000{i}.mp4")["seed"] for i in range(3)] == [
        j.options["seed"] for j in jobs]  # each job's seed is recorded before it runs
    assert read_video(tmp_path / "night" / "clips" / "0002.mp4")[0].shape == (9, 64, 64, 3)


def test_run_queue_with_a_failing_job_exits_nonzero_and_names_it(tiny_model, tmp_path, capsys):
    queue = JobQueue(tmp_path / "queue.json")
    queue.add(QueuedJob(mode="text_to_video", prompt="a red ball", model={"model": str(tiny_model)},
                        options={"num_frames": 169}))
    assert cli.main(["run-queue", str(queue.path)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "failed: num_frames must be 1 + 8k and at most 161" in err and "Traceback" not in err
    assert read_queue(queue.path)[0][0].state == "failed"


def test_run_queue_on_a_missing_file_is_one_line(tmp_path, capsys):
    assert cli.main(["run-queue", str(tmp_path / "none.json")]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip() == f"error: no such queue file: {tmp_path / 'none.json'}"


def test_a_full_disk_fails_the_job_and_the_queue_goes_on_in_memory(tmp_path, monkeypatch):
    """The worker marks the job failed with the disk's sentence and runs the next one, though the queue file cannot
    be written; the states it reports stay right."""
    import errno

    from pyramid_app.jobs import queue as job_queue

    queue = JobQueue(tmp_path / "queue.json")
    queue.add(job("a"))
    queue.add(job("b"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def run(queued):
        if queued.prompt == "a":
            said = OSError("disk full while writing /srv/out/a.mp4")
            said.errno = errno.ENOSPC
            raise said
        return tmp_path / "b.mp4"

    monkeypatch.setattr(job_queue, "write_queue", full)
    counts = run_jobs(queue, run, (Exception,))
    assert counts["failed"] == 1 and counts["done"] == 1 and counts["running"] == 0
    assert queue.jobs[0].error == "disk full while writing /srv/out/a.mp4"
