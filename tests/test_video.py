from __future__ import annotations

import numpy as np
import pytest
import torch

from mmldm_data.video import center_crop, letterbox, to_model_frames, to_uint8_frames


def _frames(height: int, width: int, count: int = 2, value: int = 200) -> np.ndarray:
    return np.full((count, height, width, 3), value, np.uint8)


def test_letterbox_keeps_aspect_and_pads_with_black():
    out = letterbox(_frames(20, 40), 32)  # wide: resized to 16 x 32, 8 rows of padding above and below
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.all(out[..., :8, :] == -1) and torch.all(out[..., 24:, :] == -1)
    torch.testing.assert_close(out[..., 8:24, :], torch.full((2, 3, 16, 32), 200 / 127.5 - 1))

    tall = letterbox(_frames(45, 15), 30)  # resized to 30 x 10, 10 columns of padding either side
    assert torch.all(tall[..., :10] == -1) and torch.all(tall[..., 20:] == -1)
    assert torch.all(tall[..., 10:20] > 0)


def test_letterbox_of_square_frames_is_a_plain_resize():
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert letterbox(frames, 32).shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(to_uint8_frames(letterbox(frames, 64)), frames)  # exact at the same size


def test_center_crop_fills_the_square():
    frames = _frames(20, 40)
    frames[:, :, :4] = 0  # a black band on the far left is cropped away
    out = center_crop(frames, 16)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 200 / 127.5 - 1))
    assert center_crop(_frames(50, 30), 24).shape == (2, 3, 24, 24)


def test_to_model_frames_dispatch_and_inverse():
    frames = torch.from_numpy(_frames(24, 32))
    assert torch.equal(to_model_frames(frames, 16), letterbox(frames, 16))
    assert torch.equal(to_model_frames(frames, 16, mode="center_crop"), center_crop(frames, 16))
    with pytest.raises(ValueError, match="letterbox"):
        to_model_frames(frames, 16, mode="stretch")
    restored = to_uint8_frames(center_crop(frames, 24))
    assert restored.dtype == np.uint8 and restored.shape == (2, 24, 24, 3)
    assert np.all(restored == 200)
    with pytest.raises(ValueError, match="RGB"):
        letterbox(np.zeros((2, 8, 8), np.uint8), 8)
