"""The studio's queue through its API on a tiny checkpoint: jobs run in the background, the queue outlives the app."""
import time
from pathlib import Path

import pytest
from gradio_client import Client

from pyramid_app.jobs.queue import JobQueue, QueuedJob, read_queue
from model_core.media_files import read_metadata
from test_studio import FAST, launch_studio, local_path
from tiny_checkpoint import build_tiny_checkpoint

QUEUE_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "miniflux")


def wait_until_done(queue_file, count):
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while time.monotonic() < deadline:
        jobs = read_queue(queue_file)[0] if queue_file.is_file() else []
        if len(jobs) == count and all(job.state in ("done", "failed") for job in jobs):
            return jobs
        time.sleep(0.2)
    raise AssertionError(f"the queue did not finish: {[job.state for job in read_queue(queue_file)[0]]}")


def test_queued_jobs_run_and_the_queue_survives_a_restart(tiny_model, tmp_path):
    output_dir, queue_file = tmp_path / "outputs", tmp_path / "outputs" / "queue.json"
    demo, url = launch_studio(tiny_model, output_dir)
    try:
        client = Client(url, verbose=False, download_files=False)
        rows, status = client.predict("a red ball", num_frames=9, seed="5", **FAST, api_name="/queue_text_to_video")
        assert status.startswith("Queued as #1") and [row[3] for row in rows["data"]] == ["a red ball"]
        first = wait_until_done(queue_file, 1)[0]
        assert first.state == "done", first.error
    finally:
        demo.close()
    made = output_dir / first.output
    assert read_metadata(made)["prompt"] == "a red ball" and read_metadata(made)["seed"] == 5
    # a job left pending while the app was down runs when it starts again; the finished one is not redone
    JobQueue(queue_file).add(QueuedJob(mode="text_to_video", prompt="a blue cube", model={"model": str(tiny_model)},
                                       options={"num_frames": 9, "seed": 6, "guidance_scale": 1, "video_guidance_scale": 1,
                                                "first_frame_steps": [1, 1, 1], "video_steps": [1, 1, 1]}))
    stamp = made.stat().st_mtime_ns
    demo, url = launch_studio(tiny_model, output_dir)
    try:
        jobs = wait_until_done(queue_file, 2)
        assert [(job.prompt, job.state) for job in jobs] == [("a red ball", "done"), ("a blue cube", "done")]
        assert made.stat().st_mtime_ns == stamp
        assert read_metadata(output_dir / jobs[1].output)["prompt"] == "a blue cube"
        client = Client(url, verbose=False, download_files=False)
        rows, _ = client.predict("a green cone", num_frames=9, **FAST, api_name="/queue_text_to_video")
        assert [row[1:4] for row in rows["data"]][:2] == [["done", "text to video", "a red ball"],
                                                          ["done", "text to video", "a blue cube"]]
        assert wait_until_done(queue_file, 3)[2].state == "done"
    finally:
        demo.close()


def test_a_bad_queued_request_is_refused_with_a_sentence(tiny_model, tmp_path):
    demo, url = launch_studio(tiny_model, tmp_path / "outputs")
    try:
        client = Client(url, verbose=False, download_files=False)
        with pytest.raises(Exception, match="Upload an image to animate first"):
            client.predict(None, "it drifts", num_frames=9, **FAST, api_name="/queue_image_to_video")
        with pytest.raises(Exception, match="seed must be a whole number"):
            client.predict("a red ball", seed="abc", **FAST, api_name="/queue_text_to_video")
    finally:
        demo.close()
    assert not (tmp_path / "outputs" / "queue.json").exists()


def test_the_segment_table_makes_a_storyboard_and_reuse_fills_it(tiny_model, tmp_path):
    from pyramid_app.studio import gallery

    demo, url = launch_studio(tiny_model, tmp_path / "outputs")
    try:
        client = Client(url, verbose=False, download_files=False)
        table = {"headers": ["seconds", "prompt"], "data": [[1, "a red ball"], [1, "a blue cube"]]}
        video, *_ = client.predict("ignored", 9, storyboard=table, seed="4", **FAST, api_name="/text_to_video")
        settings = read_metadata(local_path(video))
        assert settings["num_frames"] == 17 and [s["prompt"] for s in settings["storyboard"]["segments"]] == [
            "a red ball", "a blue cube"]
        assert gallery.control_values(settings)["storyboard"] == [[1.0, "a red ball"], [1.0, "a blue cube"]]
        with pytest.raises(Exception, match="[Ss]toryboard row 2 needs its seconds as a number"):
            client.predict("x", storyboard={"headers": ["seconds", "prompt"], "data": [[1, "a"], ["soon", "b"]]},
                           **FAST, api_name="/text_to_video")
    finally:
        demo.close()


def test_a_storyboard_runs_past_the_slider_to_the_long_video_length_except_when_hosted():
    from model_core.checkpoints import VariantSpec
    from model_core.storyboard import Storyboard
    from pyramid_app.options.catalog import length_limits
    from pyramid_app.studio.endpoints import _generation_options

    spec = VariantSpec(height=64, width=64, max_latent_frames=3, fps=8)  # the bundled model: the slider stops at 17
    controls = {**FAST, "negative_prompt": "", "seed": "3"}
    assert length_limits(spec)[1] == 17 and length_limits(spec, long_video=True)[1] == 161  # 20 s at 8 fps
    twenty = Storyboard.coerce([(12.0, "a red ball moving right"), (8.0, "a red ball moving left")])
    options = _generation_options("text_to_video", controls, None, spec, storyboard=twenty, long_video=True)
    assert options.seed == 3 and options.num_frames is None  # the storyboard's seconds set the length
    with pytest.raises(ValueError, match=r"lasts 21 s \(169 frames\); this model makes at most 161 frames \(20.1 s\)"):
        _generation_options("text_to_video", controls, None, spec, long_video=True,
                            storyboard=Storyboard.coerce([(12.0, "a"), (9.0, "b")]))
    with pytest.raises(ValueError, match=r"at most 17 frames \(2.1 s\) on this hosted studio"):
        _generation_options("text_to_video", controls, None, spec, storyboard=twenty, long_video=False)


def test_hosted_queues_are_the_sessions_own_and_end_with_the_server(tiny_model, tmp_path):
    """A hosted queue lives in its session's keyed-hash output folder, never under the raw session hash, and jobs a
    stranger left waiting are not run by the next server (its key names other folders)."""
    import threading

    from pyramid_app.studio.sessions import PipelineCache
    from pyramid_app.jobs.output_file import save
    from pyramid_app.studio.outputs import SessionOutputs
    from pyramid_app.jobs.runner import read_input_file
    from pyramid_app.studio.queue_panel import StudioQueues

    def studio_queues():
        outputs = SessionOutputs(tmp_path, hosted=True)
        queues = StudioQueues(tmp_path, PipelineCache(), threading.Lock(), save, read_input_file,
                              session_folder=outputs.folder)
        return outputs, queues

    options = {"num_frames": 9, "seed": 6, "guidance_scale": 1, "video_guidance_scale": 1,
               "first_frame_steps": [1, 1, 1], "video_steps": [1, 1, 1]}
    outputs, queues = studio_queues()
    queue = queues.queue("abc123")
    queue.set_paused(True)
    queue.add(QueuedJob(mode="text_to_video", prompt="a red ball", model={"model": str(tiny_model)}, options=options))
    assert queue.path.is_relative_to(outputs.folder("abc123")) and "abc123" not in str(queue.path)
    assert queues.queue("def456").jobs == []
    _, restarted = studio_queues()
    assert restarted.queue("abc123").jobs == [] and restarted.queue("abc123").path != queue.path
    assert queue.path.is_file()  # left for the sweep, never run again


def test_finished_queued_jobs_join_the_gallery_and_the_export_file_is_ready(tiny_model, tmp_path):
    """What the studio's 2-second refresh shows: the finished job's output with its caption (in the table and in the
    session's gallery, once), the panel title counting the jobs, and a current export file for a one-click download."""
    import gradio as gr

    from pyramid_app.studio.endpoints import Endpoints

    endpoints = Endpoints(tiny_model, tmp_path / "outputs")
    controls = dict(model=str(tiny_model), variant="auto", dtype="float32", offload="none", quantize="none",
                    vae_tiling=False, negative_prompt="", seed="5", **FAST)
    _, status = endpoints.queue_text_to_video("a red ball", 9, **controls)
    assert status == "Queued as #1: a red ball"
    endpoints.queues.wait("local", timeout=QUEUE_TIMEOUT_S)
    rows, paused, title, export, history, items = endpoints.queue_view([], announce=False)
    assert rows == [[1, "done", "text to video", "a red ball", "9 frames · seed 5 · in this session's outputs"]]
    assert not paused and title["label"] == "Queue: 1 done"
    assert [(entry["path"], entry["settings"]["prompt"]) for entry in history] == [(
        str(tmp_path / "outputs" / read_queue(tmp_path / "outputs" / "queue.json")[0][0].output), "a red ball")]
    assert items == [(history[0]["path"], "Text → Video · 9 frames · seed 5 — a red ball")]
    exported, _ = read_queue(Path(export))
    assert [(job.prompt, job.state) for job in exported] == [("a red ball", "done")]
    _, _, _, same_export, unchanged_history, unchanged_items = endpoints.queue_view(history, announce=False)
    assert same_export == export and unchanged_history == gr.skip() and unchanged_items == gr.skip()


def test_the_queue_panel_title_counts_the_jobs(tmp_path):
    from pyramid_app.studio.queue_panel import queue_badge

    queue = JobQueue(tmp_path / "queue.json")
    assert queue_badge(queue) == "Queue"
    jobs = [queue.add(QueuedJob(mode="text_to_image", prompt=f"job {n}")) for n in range(5)]
    queue.update(jobs[0].id, state="done")
    queue.update(jobs[1].id, state="failed", error="no")
    queue.update(jobs[2].id, state="running")
    assert queue_badge(queue) == "Queue: 1 running · 2 waiting · 1 done · 1 failed"
    queue.set_paused(True)
    assert queue_badge(queue) == "Queue: 1 running · 2 waiting (paused) · 1 done · 1 failed"
