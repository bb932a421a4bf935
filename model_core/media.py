"""Pixels at the pipeline boundary: uint8 [T, H, W, 3] frames <-> [B, 3, T, H, W] video in [-1, 1]."""
import numpy as np
import torch
import torch.nn.functional as F

from .media_size import cover_size


def as_frames(media, what: str) -> torch.Tensor:
    """An image (PIL, [H, W, 3] array) or a clip ([T, H, W, 3]) as a uint8 tensor [T, H, W, 3]."""
    array = torch.as_tensor(np.asarray(media))
    if array.dim() == 3:
        array = array.unsqueeze(0)
    if array.dim() != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"{what} must be RGB frames shaped [H, W, 3] or [T, H, W, 3]; got shape {list(array.shape)}")
    if array.dtype != torch.uint8:
        raise ValueError(f"{what} must hold uint8 pixel values 0..255; got {array.dtype}")
    return array


def to_video_tensor(frames: torch.Tensor, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [1, 3, T, height, width] in [-1, 1], resized to cover then centre-cropped."""
    video = frames.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    size = cover_size(*video.shape[-2:], height, width, shrink_only=False)
    if size != tuple(video.shape[-2:]):
        video = F.interpolate(video, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[..., top : top + height, left : left + width].clamp(-1, 1)
    return video.permute(1, 0, 2, 3).unsqueeze(0).to(dtype)


def to_frames(video: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 numpy [T, H, W, 3], rounded to the nearest level (or truncated towards
    zero, as the authors' implementation converts)."""
    pixels = video[0].float().clamp(-1, 1).add_(1).mul_(127.5)  # in place on clamp's copy: one video-sized buffer
    pixels = (pixels if truncate else pixels.round_()).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()
