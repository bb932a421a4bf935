"""Uploaded images and clips: sized up from their headers and refused beyond the caps, only then decoded."""
from model_core.media_files import probe_image, probe_video, read_image, read_video

from . import limits


def image_frames(path):
    """The upload as uint8 [H, W, 3], refused beyond the image cap before decoding."""
    limits.image_upload(probe_image(path), path)
    return read_image(path, max_pixels=limits.IMAGE_MAX_PIXELS)


def video_frames(path):
    """The upload as uint8 [T, H, W, 3], refused beyond the clip caps before decoding (and while decoding, should
    the header understate)."""
    limits.video_upload(probe_video(path), path)
    return read_video(path, max_frames=limits.VIDEO_MAX_FRAMES, max_pixels=limits.VIDEO_MAX_PIXELS)[0]
