"""One seed, one video: the same inputs, seed and settings give bit-identical decoded frames in fresh processes,
through the CLI and through the studio's handlers, with the bundled model and few steps."""
import os
import subprocess
import sys

import numpy as np

from model_core.media_files import read_metadata, read_video, sidecar_path
from pyramid_app import cli
from pyramid_app.options import settings

ROOT = settings.BUNDLED_MODEL.parents[2]
FEW_STEPS = ("--first-frame-steps", "2,2,2", "--video-steps", "2,2,2")
PROCESS_TIMEOUT_S = 300
STUDIO_CALL = """
import asyncio, sys
from pyramid_app.options import catalog
from pyramid_app.studio import gallery
from pyramid_app.studio.endpoints import Endpoints

controls = dict(model=catalog.BUNDLED, variant="auto", dtype="float32", offload="none", quantize="none",
                vae_tiling=False, negative_prompt="", seed="11", guidance_scale=4, video_guidance_scale=4,
                **{gallery.step_control(name, stage): 2 for name in ("first_frame_steps", "video_steps")
                   for stage in range(3)})


async def generate():
    updates = Endpoints(output_dir=sys.argv[1]).text_to_video("a red square moving left", 9, [],
                                                             progress=lambda *args, **kwargs: None, **controls)
    return [update async for update in updates]

print(asyncio.run(generate())[-1][0])
"""


def fresh_python(*arguments) -> subprocess.CompletedProcess:
    """`python ARGUMENTS` in a new process started from the repository root."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, *map(str, arguments)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path}, timeout=PROCESS_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_two_cli_processes_with_one_seed_write_the_same_frames(tmp_path):
    outputs = [tmp_path / "first.mp4", tmp_path / "second.mp4"]
    for out in outputs:
        fresh_python("-m", "pyramid_app", "generate", "--prompt", "a blue circle moving right", "--seed", 1,
                     "--num-frames", 9, *FEW_STEPS, "--out", out, "--quiet")
    first, second = (read_video(out)[0] for out in outputs)
    assert first.shape == (9, 64, 64, 3) and np.array_equal(first, second)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()  # the encoder too: same frames, same bytes
    assert read_metadata(outputs[0])["model"] == "bundled"  # as the studio names it, not the folder on this disk
    assert str(settings.BUNDLED_MODEL) not in sidecar_path(outputs[0]).read_text()


def test_two_studio_processes_with_one_seed_write_the_same_frames(tmp_path):
    videos = [fresh_python("-c", STUDIO_CALL, tmp_path / name).stdout.strip().splitlines()[-1]
              for name in ("first", "second")]
    first, second = (read_video(video)[0] for video in videos)
    assert first.shape == (9, 64, 64, 3) and np.array_equal(first, second)
    assert read_metadata(videos[0])["model"] == "bundled"


def test_a_one_segment_storyboard_writes_the_frames_of_its_prompt(tmp_path):
    (tmp_path / "story.txt").write_text("1 | a green triangle moving up\n")
    common = ["generate", "--seed", "5", *FEW_STEPS, "--quiet"]
    assert cli.main([*common, "--storyboard", str(tmp_path / "story.txt"), "--out", str(tmp_path / "story.mp4")]) == 0
    assert cli.main([*common, "--prompt", "a green triangle moving up", "--num-frames", "9",
                     "--out", str(tmp_path / "plain.mp4")]) == 0
    story, plain = read_video(tmp_path / "story.mp4")[0], read_video(tmp_path / "plain.mp4")[0]
    assert story.shape == (9, 64, 64, 3) and np.array_equal(story, plain)
