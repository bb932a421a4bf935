"""Media files at the app boundary: H.264 mp4 and PNG with the generation settings embedded.

Frames are `uint8 [T, H, W, 3]` RGB. Every file is written under a temporary name in the same
folder and renamed into place, so a failure never leaves a partial file at the requested path.
The settings travel three ways that all read back identically: the mp4 `comment` tag, the PNG
`Comment` text chunk, and a JSON sidecar next to the media file.
"""
import json
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from moviepy.video.io.ffmpeg_reader import ffmpeg_parse_infos
from moviepy.video.io.ffmpeg_writer import FFMPEG_VideoWriter
from PIL import Image, PngImagePlugin, UnidentifiedImageError

METADATA_KEY = "comment"
PNG_METADATA_KEY = "Comment"
VIDEO_KINDS = "a video ffmpeg can decode (mp4, webm, mov, mkv, gif)"
IMAGE_KINDS = "an image file (png, jpeg, webp, bmp)"
FFMETADATA_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def sidecar_path(path) -> Path:
    return Path(path).with_suffix(".json")


def write_video(frames: np.ndarray, path, fps, metadata: dict) -> Path:
    """Encode browser-playable H.264 (yuv420p, faststart) with `metadata` as JSON in the mp4 and a sidecar."""
    frames = _checked_frames(frames)
    path = Path(path)
    text = _metadata_text(metadata)
    with _staged(path) as media, _staged(sidecar_path(path)) as sidecar:
        _encode_h264(_even_sized(frames), media, fps, text)
        if _mp4_metadata_text(media) != text:
            raise OSError(f"could not write {path}: ffmpeg did not produce a readable mp4")
        sidecar.write_text(text)
    return path


def write_image(frame: np.ndarray, path, metadata: dict) -> Path:
    """Save one `uint8 [H, W, 3]` frame as PNG with `metadata` in a text chunk and a sidecar."""
    frame = _checked_frames(frame[None])[0]
    path = Path(path)
    text = _metadata_text(metadata)
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_METADATA_KEY, text)
    with _staged(path) as image, _staged(sidecar_path(path)) as sidecar:
        Image.fromarray(frame).save(image, format="PNG", pnginfo=info)
        sidecar.write_text(text)
    return path


def read_metadata(path) -> dict:
    """The settings embedded in an mp4 or PNG written here, else those in its JSON sidecar."""
    path = _existing(path)
    text = _embedded_metadata_text(path)
    if text is None and sidecar_path(path).is_file():
        text = sidecar_path(path).read_text()
    if text is None:
        raise ValueError(f"{path} carries no generation settings and has no sidecar {sidecar_path(path).name}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"the generation settings stored with {path} are not valid JSON") from error


def read_video(path) -> tuple:
    """Decode every frame as `uint8 [T, H, W, 3]` RGB; returns (frames, fps)."""
    path = _existing(path)
    try:
        info = ffmpeg_parse_infos(str(path))
        width, height = info["video_size"]
        fps = info["video_fps"]
    except (OSError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"cannot read video {path}: expected {VIDEO_KINDS}") from error
    decoded = _run_ffmpeg("-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-")
    frame_bytes = height * width * 3
    if decoded.returncode != 0 or not decoded.stdout or len(decoded.stdout) % frame_bytes:
        raise ValueError(f"cannot read video {path}: it is damaged or not {VIDEO_KINDS}")
    frames = np.frombuffer(decoded.stdout, np.uint8).reshape(-1, height, width, 3)
    return frames.copy(), fps


def read_image(path) -> np.ndarray:
    """Load an image as `uint8 [H, W, 3]` RGB: alpha dropped, greyscale and palettes expanded."""
    path = _existing(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: expected {IMAGE_KINDS}") from error


def _checked_frames(frames) -> np.ndarray:
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
            and frames.shape[0] > 0 and frames.shape[-1] == 3):
        raise ValueError("frames must be a uint8 array shaped [T, H, W, 3] with at least one frame")
    return frames


def _even_sized(frames: np.ndarray) -> np.ndarray:
    """yuv420p stores colour at half resolution, so odd sizes gain one repeated edge row/column."""
    _, height, width, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def _encode_h264(frames: np.ndarray, path: Path, fps, comment: str) -> None:
    _, height, width, _ = frames.shape
    options = ["-pix_fmt", "yuv420p", "-movflags", "+faststart", "-metadata", f"{METADATA_KEY}={comment}"]
    try:
        with FFMPEG_VideoWriter(str(path), (width, height), fps, codec="libx264", ffmpeg_params=options) as writer:
            for frame in frames:
                writer.write_frame(np.ascontiguousarray(frame))
    except OSError as error:
        raise OSError(f"could not encode {path.name}: ffmpeg stopped ({str(error).splitlines()[0]})") from error


def _metadata_text(metadata: dict) -> str:
    return json.dumps(metadata, sort_keys=True)


def _embedded_metadata_text(path: Path):
    if path.suffix.lower() == ".png":
        try:
            with Image.open(path) as image:
                return image.info.get(PNG_METADATA_KEY)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"cannot read image {path}: expected {IMAGE_KINDS}") from error
    return _mp4_metadata_text(path)


def _mp4_metadata_text(path: Path):
    """The container's `comment` tag, unescaped from ffmpeg's ffmetadata format."""
    listing = _run_ffmpeg("-i", str(path), "-f", "ffmetadata", "-")
    if listing.returncode != 0:
        return None
    prefix = f"{METADATA_KEY}=".encode()
    for line in listing.stdout.splitlines():
        if line.startswith(prefix):
            return FFMETADATA_ESCAPE.sub(r"\1", line[len(prefix):].decode("utf-8"))
    return None


def _run_ffmpeg(*arguments) -> subprocess.CompletedProcess:
    return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", *arguments],
                          capture_output=True)


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    return path


@contextmanager
def _staged(path: Path):
    """Yield a temporary sibling of `path` (same suffix); rename it into place only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    os.close(handle)
    staged = Path(name)
    try:
        yield staged
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, path)
