"""Media files: H.264/PNG round trips, embedded settings, atomic writes, clear errors. No model needed."""
import json
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from pyramid_app import video
from pyramid_app.video import read_image, read_metadata, read_video, sidecar_path, write_image, write_video

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
    listing = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    assert "Video: h264" in listing.stderr and "yuv420p" in listing.stderr
    content = path.read_bytes()
    assert content.index(b"moov") < content.index(b"mdat")  # faststart: playable while downloading


def test_odd_sizes_are_padded_to_even_by_repeating_the_edge(tmp_path):
    clip = smooth_clip(height=33, width=47)
    frames, _ = read_video(write_video(clip, tmp_path / "odd.mp4", fps=24, metadata={}))
    assert frames.shape == (9, 34, 48, 3)
    assert np.abs(frames[:, :33, :47].astype(int) - clip).mean() < 3


def test_metadata_round_trips_exactly_from_mp4_png_and_sidecar(tmp_path):
    mp4 = write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata=SETTINGS)
    png = write_image(smooth_clip(1)[0], tmp_path / "still.png", metadata=SETTINGS)
    assert read_metadata(mp4) == SETTINGS
    assert read_metadata(png) == SETTINGS
    assert Image.open(png).info[video.PNG_METADATA_KEY] == sidecar_path(png).read_text()
    for media in (mp4, png):
        assert json.loads(sidecar_path(media).read_text()) == SETTINGS


def test_metadata_falls_back_to_the_sidecar(tmp_path):
    clip_path = tmp_path / "plain.mp4"
    write_video(smooth_clip(), tmp_path / "tagged.mp4", fps=24, metadata={})
    video._run_ffmpeg("-i", str(tmp_path / "tagged.mp4"), "-map_metadata", "-1", "-c", "copy", str(clip_path))
    with pytest.raises(ValueError, match="no generation settings"):
        read_metadata(clip_path)
    sidecar_path(clip_path).write_text(json.dumps(SETTINGS))
    assert read_metadata(clip_path) == SETTINGS


def test_missing_metadata_is_a_clear_error(tmp_path):
    Image.fromarray(smooth_clip(1)[0]).save(tmp_path / "bare.png")
    with pytest.raises(ValueError, match="bare.png carries no generation settings"):
        read_metadata(tmp_path / "bare.png")


def test_failed_encode_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_encoder(frames, path, fps, comment):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(video, "_encode_h264", broken_encoder)
    with pytest.raises(OSError, match="disk full"):
        write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata=SETTINGS)
    assert leftovers(tmp_path, keep=()) == []


def test_failed_write_keeps_the_previous_file_intact(tmp_path, monkeypatch):
    path = write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata={"take": 1})
    before = path.read_bytes()
    monkeypatch.setattr(video, "_encode_h264", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_video(smooth_clip(), path, fps=24, metadata={"take": 2})
    assert path.read_bytes() == before and read_metadata(path) == {"take": 1}
    assert leftovers(tmp_path, keep=("clip.mp4", "clip.json")) == []


def test_failed_png_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_save(self, fp, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        write_image(smooth_clip(1)[0], tmp_path / "still.png", metadata={})
    assert leftovers(tmp_path, keep=()) == []


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 500])
def test_corrupt_video_is_a_one_line_error_naming_the_file(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
        read_video(path)
    message = str(caught.value)
    assert "broken.mp4" in message and "mp4" in message and "\n" not in message


def test_truncated_video_is_a_clear_error(tmp_path):
    path = write_video(smooth_clip(), tmp_path / "clip.mp4", fps=24, metadata={})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(ValueError, match="clip.mp4"):
        read_video(path)


def test_missing_files_raise_file_not_found(tmp_path):
    for reader in (read_video, read_image, read_metadata):
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
