"""Media files: H.264/PNG round trips, embedded settings, header-only probes and caps, streaming,
atomic writes without litter, clear errors. No model needed."""
import errno
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from model_core import media_files
from model_core.media_files import (VideoWriter, probe_image, probe_video, read_image, read_metadata, read_video,
                                    sidecar_path, sweep_partials, write_image, write_video)

ROOT = Path(__file__).resolve().parents[1]
WRITTEN_BY_MOVIEPY = Path(__file__).parent / "media" / "written_by_moviepy.mp4"  # by the moviepy/ffmpeg writer before PyAV
SHAPES_CLIP_BY_MOVIEPY = Path(__file__).parent / "media" / "shapes_clip_by_moviepy.mp4"  # "a red circle moving up", seed 11
SETTINGS = {
    "mode": "text_to_video", "prompt": 'a "red" ball; x = y # not a comment \\ backslash\nnew line, héllo ✓',
    "seed": 2**40 + 7, "first_frame_steps": [20, 20, 20], "guidance_scale": 7.0, "negative_prompt": "",
    "nested": {"list": [1, 2.5, None, True]},
}


def smooth_clip(frames=9, height=32, width=48) -> np.ndarray:
    """A slowly drifting colour gradient: easy for H.264, so decoded pixels stay close."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    channels = [64 + 2 * x + t, 64 + 3 * y, 200 - 2 * x - y + t]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def leftovers(folder, keep) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def copy_stream(source, target, container_format, rotation=None) -> Path:
    """Remux the video stream of `source` into `target` (no re-encode, no comment), optionally marked rotated."""
    with av.open(str(source)) as inp, av.open(str(target), "w", format=container_format) as out:
        copy = out.add_stream_from_template(inp.streams.video[0])
        if rotation is not None:
            copy.set_display_rotation(rotation)
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = copy
                out.mux(packet)
    return Path(target)


def png_header(width, height) -> bytes:
    """A PNG whose IHDR claims `width` x `height` RGB pixels, with one tiny IDAT: a header-only bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# ---- round trips -------------------------------------------------------------------------------

def test_video_round_trip_keeps_length_size_fps_and_pixels(tmp_path):
    clip = smooth_clip()
    path = write_video(clip, tmp_path / "clip.mp4", fps=24, metadata=SETTINGS)
    frames, fps = read_video(path)
    assert frames.dtype == np.uint8 and frames.shape == clip.shape
    assert fps == 24
    assert np.abs(frames.astype(int) - clip).mean() < 3


@pytest.mark.parametrize("length", [1, 17])
def test_every_frame_comes_back(tmp_path, length):
    frames, _ = read_video(write_video(smooth_clip(length), tmp_path / "clip.mp4", fps=8, metadata={}))
    assert len(frames) == length


def test_encoding_is_browser_playable_h264(tmp_path):
    path = write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata={})
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    content = path.read_bytes()
    assert content.index(b"moov") < content.index(b"mdat")  # faststart: playable while downloading


def test_fractional_frame_rates_come_back(tmp_path):
    path = write_video(smooth_clip(), tmp_path / "ntsc.mp4", fps=30000 / 1001, metadata={})
    assert probe_video(path).fps == pytest.approx(30000 / 1001)


def test_odd_sizes_are_padded_to_even_by_repeating_the_edge(tmp_path):
    clip = smooth_clip(height=33, width=47)
    frames, _ = read_video(write_video(clip, tmp_path / "odd.mp4", fps=24, metadata={}))
    assert frames.shape == (9, 34, 48, 3)
    assert np.abs(frames[:, :33, :47].astype(int) - clip).mean() < 3


@pytest.mark.parametrize("rotation", [90, 180, -90])
def test_phone_videos_with_a_display_rotation_come_out_upright(tmp_path, rotation):
    """The rotated copy must read as ffmpeg's autorotate shows it: the stored frames turned counter-clockwise."""
    stored, _ = read_video(write_video(smooth_clip(), tmp_path / "stored.mp4", fps=24, metadata={}))
    rotated = copy_stream(tmp_path / "stored.mp4", tmp_path / "rotated.mp4", "mp4", rotation=rotation)
    frames, _ = read_video(rotated)
    assert np.array_equal(frames, np.rot90(stored, k=rotation // 90, axes=(1, 2)))


def test_metadata_round_trips_exactly_from_mp4_png_and_sidecar(tmp_path):
    mp4 = write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata=SETTINGS)
    png = write_image(smooth_clip(1)[0], tmp_path / "still.png", metadata=SETTINGS)
    assert read_metadata(mp4) == SETTINGS
    assert read_metadata(png) == SETTINGS
    assert Image.open(png).info[media_files.PNG_METADATA_KEY] == sidecar_path(png).read_text()
    for media in (mp4, png):
        assert json.loads(sidecar_path(media).read_text()) == SETTINGS


def test_videos_written_before_pyav_still_read_back():
    assert read_metadata(WRITTEN_BY_MOVIEPY) == SETTINGS
    frames, fps = read_video(WRITTEN_BY_MOVIEPY)
    assert fps == 8 and frames.shape == (4, 16, 24, 3)
    assert np.abs(frames.astype(int) - smooth_clip(4, 16, 24)).mean() < 3


def test_shapes_world_clips_decode_as_they_did_with_the_moviepy_writer(tmp_path):
    """The bundled model was trained and is evaluated on these clips: the encoder must not move their pixels."""
    from training.shapes_world import FPS, NUM_FRAMES, render_clip

    before, _ = read_video(SHAPES_CLIP_BY_MOVIEPY)
    now, _ = read_video(write_video(render_clip("a red circle moving up", 11, NUM_FRAMES), tmp_path / "clip.mp4",
                                    fps=FPS, metadata={}))
    # 0 where the reference was written (same x264 threads); bilinear colour conversion would give about 0.2
    assert np.abs(now.astype(int) - before).mean() < 0.05


def test_metadata_falls_back_to_the_sidecar(tmp_path):
    write_video(smooth_clip(), tmp_path / "tagged.mp4", fps=24, metadata={})
    clip_path = copy_stream(tmp_path / "tagged.mp4", tmp_path / "plain.mp4", "mp4")
    with pytest.raises(ValueError, match="no generation settings"):
        read_metadata(clip_path)
    sidecar_path(clip_path).write_text(json.dumps(SETTINGS))
    assert read_metadata(clip_path) == SETTINGS


def test_missing_metadata_is_a_clear_error(tmp_path):
    Image.fromarray(smooth_clip(1)[0]).save(tmp_path / "bare.png")
    with pytest.raises(ValueError, match="bare.png carries no generation settings"):
        read_metadata(tmp_path / "bare.png")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_settings_that_are_not_valid_json_are_refused_before_writing(tmp_path, bad):
    settings = {"guidance_scale": 7.0, "stages": [{"video_guidance_scale": bad}]}
    with pytest.raises(ValueError, match=r"not finite \(settings\['stages'\]\[0\]\['video_guidance_scale'\]"):
        write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata=settings)
    with pytest.raises(ValueError, match="every number must be finite"):
        write_image(smooth_clip(1)[0], tmp_path / "still.png", metadata=settings)
    assert leftovers(tmp_path, keep=()) == []


# ---- header-only probes and caps ---------------------------------------------------------------

def test_probe_video_reads_the_headers(tmp_path):
    path = write_video(smooth_clip(17, height=33, width=47), tmp_path / "clip.mp4", fps=8, metadata={})
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames, info.fps) == (48, 34, 17, 8.0)
    assert info.duration == pytest.approx(17 / 8)


def test_probe_video_estimates_the_count_when_the_container_has_none(tmp_path):
    mkv = copy_stream(write_video(smooth_clip(17), tmp_path / "clip.mp4", fps=8, metadata={}), tmp_path / "clip.mkv",
                      "matroska")
    with av.open(str(mkv)) as container:
        assert container.streams.video[0].frames == 0  # matroska stores no frame count
    assert probe_video(mkv).num_frames == 17
    frames, fps = read_video(mkv)
    assert frames.shape == (17, 32, 48, 3) and fps == 8


def test_read_video_refuses_too_many_frames_before_decoding(tmp_path):
    path = write_video(smooth_clip(17), tmp_path / "clip.mp4", fps=8, metadata={})
    with pytest.raises(ValueError, match=r"clip.mp4 has 17 frames; at most 16 are allowed"):
        read_video(path, max_frames=16)
    assert len(read_video(path, max_frames=17)[0]) == 17


def test_read_video_stops_decoding_when_the_header_understates_the_length(tmp_path, monkeypatch):
    path = write_video(smooth_clip(17), tmp_path / "clip.mp4", fps=8, metadata={})
    understated = media_files.VideoInfo(width=48, height=32, num_frames=4, fps=8.0, duration=0.5)
    monkeypatch.setattr(media_files, "_video_info", lambda *args: understated)
    with pytest.raises(ValueError, match=r"more than 10 frames; at most 10 are allowed"):
        read_video(path, max_frames=10)


def big_flat_video(path, width=2000, height=2000, frames=40) -> Path:
    """A tiny file (a few KB) that decodes to width x height x frames x 3 bytes: 480 MB at the defaults."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        picture = av.VideoFrame.from_ndarray(np.full((height, width, 3), 90, np.uint8), format="rgb24")
        picture = picture.reformat(format="yuv420p")
        for index in range(frames):
            picture.pts = index
            container.mux(stream.encode(picture))
        container.mux(stream.encode())
    return Path(path)


def test_read_video_refuses_a_huge_frame_size_before_decoding_anything(tmp_path):
    path = big_flat_video(tmp_path / "huge.mp4")
    assert path.stat().st_size < 200_000
    assert probe_video(path)[:3] == (2000, 2000, 40)
    measure = ("import resource, sys; from model_core.media_files import read_video\n"
               "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
               "try:\n    read_video(sys.argv[1], max_pixels=1_000_000)\n"
               "except ValueError as error:\n    print(error)\n"
               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    result = subprocess.run([sys.executable, "-c", measure, str(path)], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    message, growth_kib = result.stdout.strip().splitlines()
    assert message.endswith("huge.mp4 is 2000x2000 (4000000 pixels per frame); at most 1000000 pixels are allowed")
    assert int(growth_kib) < 40 * 1024  # decoding would take 480 MB; one frame alone is 12 MB


def test_probe_image_reads_only_the_header(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header(9000, 9000))  # 81 M pixels: under Pillow's bomb limit, 243 MB if decoded
    assert probe_image(path) == (9000, 9000)
    with pytest.raises(ValueError, match=r"big.png is 9000x9000 \(81000000 pixels per frame\); at most 1000000"):
        read_image(path, max_pixels=1_000_000)


def test_a_decompression_bomb_header_is_refused_fast(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100_000, 100_000))
    start = time.perf_counter()
    for reader in (probe_image, read_image, read_metadata):
        with pytest.raises(ValueError, match=r"bomb.png is too large to open safely .*at most \d+ pixels are allowed"):
            reader(path)
    assert time.perf_counter() - start < 1


# ---- streaming writer --------------------------------------------------------------------------

def test_streamed_video_equals_the_one_written_at_once(tmp_path):
    clip = smooth_clip(17, height=33, width=47)
    whole, _ = read_video(write_video(clip, tmp_path / "whole.mp4", fps=8, metadata=SETTINGS))
    with VideoWriter(tmp_path / "streamed.mp4", fps=8, width=47, height=33) as writer:
        writer.write(clip[:5])
        writer.write(clip[5])  # one [H, W, 3] frame
        writer.write(clip[6:])
        assert not (tmp_path / "streamed.mp4").exists()  # nothing at the path until close
        assert writer.close(SETTINGS) == tmp_path / "streamed.mp4"
    streamed, fps = read_video(tmp_path / "streamed.mp4")
    assert fps == 8 and np.array_equal(streamed, whole)  # equal frames, streamed or whole, encode alike
    assert read_metadata(tmp_path / "streamed.mp4") == SETTINGS
    assert leftovers(tmp_path, keep=()) == ["streamed.json", "streamed.mp4", "whole.json", "whole.mp4"]


def test_an_exception_while_streaming_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="generation failed"):
        with VideoWriter(tmp_path / "clip.mp4", fps=8, width=48, height=32) as writer:
            writer.write(smooth_clip(4))
            raise RuntimeError("generation failed")
    assert leftovers(tmp_path, keep=()) == []


def test_streaming_writer_refuses_wrong_frames_and_bad_settings_without_losing_the_video(tmp_path):
    with VideoWriter(tmp_path / "clip.mp4", fps=8, width=48, height=32) as writer:
        writer.write(smooth_clip(3))
        with pytest.raises(ValueError, match=r"frames are 47x32 but this writer of clip.mp4 takes 48x32"):
            writer.write(smooth_clip(2, width=47))
        with pytest.raises(ValueError, match="not finite"):
            writer.close({"guidance_scale": float("nan")})
        writer.close({"guidance_scale": 7.0})
    assert len(read_video(tmp_path / "clip.mp4")[0]) == 3
    assert read_metadata(tmp_path / "clip.mp4") == {"guidance_scale": 7.0}


@pytest.mark.parametrize("fps", [0, -8, float("nan"), float("inf"), "8"])
def test_streaming_writer_refuses_a_bad_frame_rate(tmp_path, fps):
    with pytest.raises(ValueError, match="fps must be a positive finite number"):
        VideoWriter(tmp_path / "clip.mp4", fps=fps, width=48, height=32)
    assert leftovers(tmp_path, keep=()) == []


def test_closing_without_frames_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no frames were written to .*clip.mp4"):
        with VideoWriter(tmp_path / "clip.mp4", fps=8, width=48, height=32) as writer:
            writer.close({})
    assert leftovers(tmp_path, keep=()) == []


# ---- atomic writes: failures, crashes, full disks ----------------------------------------------

def test_failed_encode_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_remux(source, target, comment):
        target.write_bytes(b"half a file")
        raise OSError("device error")

    monkeypatch.setattr(media_files, "_remux_with_comment", broken_remux)
    with pytest.raises(OSError, match="device error"):
        write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata=SETTINGS)
    assert leftovers(tmp_path, keep=()) == []


def test_failed_write_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata={"take": 1})
    before = path.read_bytes()
    monkeypatch.setattr(media_files, "_remux_with_comment", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_video(smooth_clip(), path, fps=24, metadata={"take": 2})
    assert path.read_bytes() == before and read_metadata(path) == {"take": 1}
    assert leftovers(tmp_path, keep=("clip.mp4", "clip.json")) == []


def test_failed_png_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        raise OSError("device error")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        write_image(smooth_clip(1)[0], tmp_path / "still.png", metadata={})
    assert leftovers(tmp_path, keep=()) == []


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_reported_as_such_with_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(media_files, "_remux_with_comment", no_space)
    with pytest.raises(OSError, match=r"^disk full while writing .*clip.mp4$") as caught:
        write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata={})
    assert caught.value.errno == errno.ENOSPC
    monkeypatch.setattr(Image.Image, "save", no_space)
    with pytest.raises(OSError, match=r"^disk full while writing .*still.png$"):
        write_image(smooth_clip(1)[0], tmp_path / "still.png", metadata={})
    assert leftovers(tmp_path, keep=()) == []


def test_a_real_full_device_is_reported_by_the_muxer_too(tmp_path, monkeypatch):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux), where every write fails with ENOSPC")
    remux = media_files._remux_with_comment
    monkeypatch.setattr(media_files, "_remux_with_comment", lambda source, target, comment:
                        remux(source, Path("/dev/full"), comment))
    with pytest.raises(OSError, match=r"^disk full while writing .*clip.mp4$"):
        write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata={})
    assert leftovers(tmp_path, keep=()) == []


CRASH_MID_WRITE = """
import os, signal, sys
import numpy as np
from model_core.media_files import VideoWriter, write_image
writer = VideoWriter(sys.argv[1] + "/long.mp4", fps=8, width=48, height=32)
writer.write(np.zeros((8, 32, 48, 3), np.uint8))
print("writing", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_write_leaves_litter_that_the_next_write_sweeps(tmp_path):
    crash = subprocess.run([sys.executable, "-c", CRASH_MID_WRITE, str(tmp_path)], capture_output=True, text=True,
                           cwd=ROOT)
    assert crash.returncode == -9 and crash.stdout == "writing\n"
    litter = leftovers(tmp_path, keep=())
    assert len(litter) == 1 and media_files.STAGED_NAME.match(litter[0]) and litter[0].startswith(".long.mp4.")
    write_video(smooth_clip(), tmp_path / "next.mp4", fps=8, metadata={})  # this process's first write here
    assert leftovers(tmp_path, keep=()) == ["next.json", "next.mp4"]


def test_sweeping_keeps_files_a_live_writer_holds(tmp_path):
    with VideoWriter(tmp_path / "live.mp4", fps=8, width=48, height=32) as writer:
        writer.write(smooth_clip(2))
        (tmp_path / ".old.mp4.k2j_x9ab.partial.mp4").write_bytes(b"left by the moviepy-era writer")
        (tmp_path / ".notes.partial").write_bytes(b"not one of ours: no 8-character token")
        live = [name for name in leftovers(tmp_path, keep=()) if name.startswith(".live.mp4.")]
        assert sweep_partials(tmp_path) == [tmp_path / ".old.mp4.k2j_x9ab.partial.mp4"]
        assert (tmp_path / live[0]).exists()
        writer.close({})
    assert leftovers(tmp_path, keep=()) == [".notes.partial", "live.json", "live.mp4"]
    assert sweep_partials(tmp_path / "missing") == []


# ---- clear errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500])
def test_corrupt_video_is_a_one_line_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    for reader in (read_video, probe_video):
        with pytest.raises(ValueError) as caught:
            reader(path)
        message = str(caught.value)
        assert "broken.mp4" in message and "mp4" in message and "\n" not in message


@pytest.mark.parametrize("kept", [1 / 3, 0.9])
def test_truncated_video_is_a_clear_error(tmp_path, kept):
    noise = np.random.default_rng(0).integers(0, 256, (12, 32, 48, 3), dtype=np.uint8)  # big frames: cuts land mid-stream
    path = write_video(noise, tmp_path / "clip.mp4", fps=24, metadata={})
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * kept)])
    with pytest.raises(ValueError, match="clip.mp4"):
        read_video(path)


def test_a_file_without_video_is_a_clear_error(tmp_path):
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(ValueError, match="sound.wav: it has no video stream"):
        read_video(path)


def test_missing_files_raise_file_not_found(tmp_path):
    for reader in (read_video, read_image, read_metadata, probe_video, probe_image):
        with pytest.raises(FileNotFoundError, match="nope"):
            reader(tmp_path / "nope.mp4")


def test_corrupt_image_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png: expected an image file"):
        read_image(path)


@pytest.mark.parametrize("image_mode", ["L", "RGBA", "P", "I;16"])
def test_images_come_back_as_rgb_uint8(tmp_path, image_mode):
    source = Image.fromarray(smooth_clip(1)[0]).convert(image_mode)
    source.save(tmp_path / "input.png")
    image = read_image(tmp_path / "input.png")
    assert image.dtype == np.uint8 and image.shape == (32, 48, 3)


def test_alpha_is_dropped_not_blended(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    Image.fromarray(rgba).save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png") == [200, 0, 0]).all()


def test_write_rejects_frames_that_are_not_uint8_rgb(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 array shaped \[T, H, W, 3\]"):
        write_video(smooth_clip().astype(np.float32), tmp_path / "clip.mp4", fps=24, metadata={})
    assert leftovers(tmp_path, keep=()) == []


def test_media_files_loads_neither_torch_nor_the_app():
    check = "import sys, model_core.media_files; print(sorted({'torch', 'pyramid_app'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
