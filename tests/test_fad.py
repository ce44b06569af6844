"""FAD backends: loaders (random weights saved to a file), front ends, the offline stand-in,
missing weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmldm_data.metrics import fad as fad_module
from mmldm_data.metrics.fad import (
    AISFX,
    VGGISH,
    AudioCLIPAudio,
    FADWeightsError,
    LinearFBSP,
    VGGish,
    fad,
    load_aisfx,
    load_audioclip,
    load_fad_backend,
    load_vggish,
    resolve_weights_path,
    vggish_examples,
    vggish_mel_matrix,
)
from mmldm_data.synthetic import render_clip


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BatchNorm statistic random, so a loader that drops or misplaces one is caught."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():  # shares storage; fixed buffers (windows) stay as built
            if tensor.is_floating_point():
                tensor.copy_(
                    torch.rand(tensor.shape, generator=generator) * 0.2 + 0.9
                    if tensor.ndim == 1
                    else torch.randn(tensor.shape, generator=generator) * 0.05
                )
    return model.eval()


# ----------------------------------------------------------------------------- missing weights


@pytest.mark.parametrize(
    ("name", "source"),
    [("vggish", "harritaylor/torchvggish/releases"), ("audioclip", "AndreyGuzhov/AudioCLIP/releases")],
)
def test_missing_weights_name_source_and_fix(name: str, source: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MMLDM_CACHE", str(tmp_path))
    monkeypatch.delenv(f"MMLDM_{name.upper()}_WEIGHTS", raising=False)
    with pytest.raises(
        FADWeightsError,
        match=rf"{name}.*not found.*{source}.*--fad-weights {name}=PATH.*"
        rf"MMLDM_{name.upper()}_WEIGHTS",
    ):
        load_fad_backend(name)
    with pytest.raises(FADWeightsError, match="absent.pth"):
        load_fad_backend(name, tmp_path / "absent.pth")


def test_missing_aisfx_package_names_the_install(monkeypatch):
    monkeypatch.setattr(fad_module.importlib.util, "find_spec", lambda *args, **kwargs: None)
    with pytest.raises(FADWeightsError, match=r"not installed.*pip install --no-deps aisfx==0\.1\.2"):
        load_aisfx()


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown FAD backend 'clap'"):
        load_fad_backend("clap")


# ----------------------------------------------------------------------------- VGGish


@pytest.mark.slow
def test_vggish_loads_torchvggish_state_dict(tmp_path: Path, monkeypatch):
    reference = randomised(VGGish(), seed=0)
    path = tmp_path / "vggish-10086976.pth"
    torch.save(reference.state_dict(), path)  # torchvggish's key layout: features.N.*, embeddings.N.*
    audio = np.stack([render_clip(0, seed).audio[:70560] for seed in range(2)])
    loaded = load_vggish(path)
    np.testing.assert_allclose(
        loaded.embed(audio, 44100), reference.embed(audio, 44100), rtol=1e-5, atol=1e-6
    )
    assert loaded.embed(audio, 44100).shape == (2, 128)  # a 1.6 s clip holds one 0.96 s example

    monkeypatch.setenv("MMLDM_VGGISH_WEIGHTS", str(path))
    assert resolve_weights_path(VGGISH) == path

    torch.save({"features.0.weight": torch.zeros(64, 1, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(
        FADWeightsError, match=r"(?s)does not fit the vggish network.*Missing key.*embeddings\.4\.bias"
    ):
        load_vggish(tmp_path / "partial.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FADWeightsError, match="not a readable PyTorch state dict"):
        load_vggish(tmp_path / "garbage.pth")


def test_vggish_front_end():
    matrix = vggish_mel_matrix()
    assert matrix.shape == (257, 64) and (matrix[0] == 0).all() and (matrix.max(axis=0) > 0.5).all()
    seconds = np.arange(25600) / 16000
    examples = vggish_examples(0.5 * np.sin(2 * np.pi * 1000.0 * seconds))
    assert examples.shape == (1, 96, 64)
    loudest_band = int(examples[0].mean(axis=0).argmax())
    centres_hz = 700 * (
        np.exp(np.linspace(*1127 * np.log(1 + np.array([125, 7500]) / 700), 66)[1:-1] / 1127) - 1
    )
    assert abs(centres_hz[loudest_band] - 1000.0) < 60.0
    with pytest.raises(ValueError, match="at least 0.975 s"):
        vggish_examples(np.zeros(8000))


# ----------------------------------------------------------------------------- AudioCLIP


def reference_fbsp_weights(
    m: torch.Tensor, fb: torch.Tensor, fc: torch.Tensor, length: int, eps: float = 1e-8
) -> torch.Tensor:
    """AudioCLIP's LinearFBSP._materialize_weights (normalized=True) with real arithmetic, -> [K, L, 2]."""
    t = np.pi * torch.linspace(-1.0, 1.0, length).reshape(1, -1, 1) + eps
    m, fb, fc = m.reshape(-1, 1, 1), fb.reshape(-1, 1, 1), fc.reshape(-1, 1, 1)
    kernel = torch.cat((torch.cos(fc * t), -torch.sin(fc * t)), dim=-1)
    x = fb * t / (m + eps)
    win = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x)
    magnitudes, phases = win.abs(), torch.atan2(torch.zeros_like(win), win)
    win_mag = (magnitudes**2) ** (0.5 * m)
    win = win_mag * torch.cat((torch.cos(m * phases), torch.sin(m * phases)), dim=-1)
    weights = fb.sqrt() * torch.cat(
        (
            win[..., :1] * kernel[..., :1] - win[..., 1:] * kernel[..., 1:],
            win[..., :1] * kernel[..., 1:] + win[..., 1:] * kernel[..., :1],
        ),
        dim=-1,
    )
    return weights / length**0.5


def test_fbsp_filterbank_matches_audioclip_formula():
    generator = torch.Generator().manual_seed(3)
    fbsp = LinearFBSP(33)
    with torch.no_grad():
        fbsp.m.copy_(torch.rand(33, generator=generator) * 2)
        fbsp.fb.copy_(torch.rand(33, generator=generator) * 3 + 0.1)
        fbsp.fc.copy_(torch.rand(33, generator=generator) * 30)
    expected = reference_fbsp_weights(fbsp.m, fbsp.fb, fbsp.fc, 64)
    actual = torch.view_as_real(fbsp.filterbank(64))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_audioclip_loads_full_checkpoint_layout(tmp_path: Path):
    reference = randomised(AudioCLIPAudio(), seed=1)
    assert reference.log_power_spectrogram(torch.zeros(1, 70560)).shape == (1, 3, 341, 124)
    # AudioCLIP-Full-Training.pt holds every tower; the audio one is under `audio.`, with its window
    # buffer and the empty bias that LinearFBSP(bias=False) leaves behind.
    checkpoint = {f"audio.{key}": value for key, value in reference.state_dict().items()}
    checkpoint["audio.window"] = reference.window.clone()
    checkpoint["audio.fbsp.bias"] = torch.empty(0)
    checkpoint["visual.conv1.weight"] = torch.zeros(4, 3, 3, 3)
    checkpoint["logit_scale_ai"] = torch.tensor(4.6)
    path = tmp_path / "AudioCLIP-Full-Training.pt"
    torch.save(checkpoint, path)
    audio = np.stack([render_clip(3, 0).audio[:8820]])  # 0.2 s keeps the ResNeXt cheap
    loaded = load_audioclip(path)
    embedding = loaded.embed(audio, 44100)
    assert embedding.shape == (1, 1024) and np.isfinite(embedding).all()
    np.testing.assert_allclose(embedding, reference.embed(audio, 44100), rtol=1e-4, atol=1e-5)

    del checkpoint["audio.att5.bn.running_var"]
    torch.save(checkpoint, path)
    with pytest.raises(FADWeightsError, match="does not fit the audioclip network"):
        load_audioclip(path)


# ----------------------------------------------------------------------------- offline stand-in


def test_aisfx_offline_backend_is_labelled_not_comparable():
    model = load_aisfx()
    assert model.weights_path.name == "checkpoint.pth" and model.weights_path.parent.parent.name == "aisfx"
    assert not AISFX.comparable and "NOT comparable" in AISFX.label
    audio = np.stack([render_clip(c, 0).audio[:70560] for c in (0, 0, 4, 4)])
    embeddings = model.embed(audio, 44100)
    assert embeddings.shape == (4, 512) and np.isfinite(embeddings).all()
    assert fad(embeddings, embeddings, AISFX) == pytest.approx(0.0, abs=1e-2)  # rank-deficient sqrtm rounding
    # Tones of different classes land far apart, two clips of one class close together.
    same = np.linalg.norm(embeddings[0] - embeddings[1])
    assert same < np.linalg.norm(embeddings[0] - embeddings[2])
    assert math.isclose(fad_module.AUDIOCLIP.scale, 1e4)
