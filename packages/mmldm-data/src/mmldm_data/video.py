"""Decoded RGB frames <-> model tensors.

The authors' transform (and the default here) is a letterbox: aspect-preserving bicubic resize so
the long side is R, then centred zero padding of the uint8 image, then ``/127.5 - 1``; padding
therefore reads -1 (black) in model space. Centre cropping is offered as an option.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

FRAME_MODES = ("letterbox", "center_crop")


def _as_channels_first(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, H, W] in 0..255."""
    frames = torch.as_tensor(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [T, H, W, 3], got shape {tuple(frames.shape)}")
    return rearrange(frames, "t h w c -> t c h w").float()


def _resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of float [T, 3, H, W] in 0..255, rounded back to the uint8 grid.

    Antialiased bicubic matches PIL's BICUBIC resize that the authors used; rounding keeps the
    values those uint8 images would hold.
    """
    if frames.shape[-2:] == (height, width):
        return frames
    resized = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return resized.round().clamp(0, 255)


def _to_model_range(frames: torch.Tensor) -> torch.Tensor:
    return frames / 127.5 - 1.0


def letterbox(frames: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [-1, 1]; padding is -1."""
    frames = _as_channels_first(frames)
    height, width = frames.shape[-2:]
    ratio = min(size / height, size / width)
    new_height, new_width = max(1, int(height * ratio)), max(1, int(width * ratio))
    frames = _resize(frames, new_height, new_width)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    padded = F.pad(frames, (left, size - new_width - left, top, size - new_height - top), value=0.0)
    return _to_model_range(padded)


def center_crop(frames: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, size, size] in [-1, 1]: short side to ``size``, centre crop."""
    frames = _as_channels_first(frames)
    height, width = frames.shape[-2:]
    ratio = size / min(height, width)
    new_height, new_width = max(size, round(height * ratio)), max(size, round(width * ratio))
    frames = _resize(frames, new_height, new_width)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return _to_model_range(frames[..., top : top + size, left : left + size])


def to_model_frames(frames: torch.Tensor | np.ndarray, size: int, mode: str = "letterbox") -> torch.Tensor:
    """Frames as the models see them; ``mode`` is one of FRAME_MODES."""
    if mode == "letterbox":
        return letterbox(frames, size)
    if mode == "center_crop":
        return center_crop(frames, size)
    raise ValueError(f"unknown frame mode {mode!r}; choose one of {FRAME_MODES}")


def to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """Model frames float [T, 3, H, W] in [-1, 1] -> uint8 [T, H, W, 3], ready for write_video."""
    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(pixels, "t c h w -> t h w c").numpy()
