"""The evaluator: FVD with the real I3D on degraded synthetic clips, the tool end to end (offline),
autoencoder round trips (a perfect one in process, a train_ae.py run's through the tool), and bad input.

I3D runs at ~1 clip/s on this CPU, so these tests use a handful of clips: FVD monotonicity is
checked on 4 clips per noise level (paired with the same clean clips), far below the protocol's
2048 but enough for noise that strong; the other tests evaluate 2 clips per side and share one
real-feature cache (the one the tool runs use), so the real clips are decoded once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool, run_tool_in_process
from media_factory import tone, write_test_video

from mmldm_ae.pipeline import load_reconstructor
from mmldm_data.evaluation import ClipBatch, EvalModels, EvalProtocol, EvalSets, evaluate, markdown_table
from mmldm_data.metrics.fad import load_aisfx
from mmldm_data.metrics.frechet import frechet_distance
from mmldm_data.metrics.i3d import i3d_features, load_i3d
from mmldm_data.synthetic import SyntheticConfig, render_clip, write_synthetic_dataset

PROTOCOL = EvalProtocol(resolution=64, num_clips=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The cache folder conftest gives every test and the tool runs."""
    return tmp_path_factory.getbasetemp() / "mmldm-cache"


@pytest.fixture(scope="module")
def models(cache: Path) -> EvalModels:
    return EvalModels(i3d=load_i3d(cache_dir=cache), fad={"aisfx": load_aisfx()})


@pytest.mark.slow
def test_fvd_is_zero_for_identical_sets_and_grows_with_noise(models: EvalModels):
    clean = np.stack([render_clip(i, seed=i).frames[:16] for i in range(4)])  # uint8 [4, 16, 64, 64, 3]
    reference = i3d_features(models.i3d, clean, batch_size=4)
    assert abs(frechet_distance(reference, reference)) < 1e-2
    rng = np.random.default_rng(0)
    fvds = []
    for sigma in (8, 24, 64):
        noisy = np.clip(clean + rng.normal(0.0, sigma, clean.shape), 0, 255).astype(np.uint8)
        fvds.append(frechet_distance(i3d_features(models.i3d, noisy, batch_size=4), reference))
    assert fvds[0] > 10 and fvds[0] < fvds[1] < fvds[2], fvds


class Identity:
    """The simplest Reconstructor: a perfect autoencoder."""

    def __init__(self) -> None:
        self.batches = 0

    def reconstruct(self, batch: ClipBatch) -> ClipBatch:
        self.batches += 1
        return batch


@pytest.mark.slow
def test_reconstruction_hook_of_a_perfect_autoencoder_scores_zero(
    models: EvalModels, synthetic_root: Path, cache: Path
):
    identity = Identity()
    sets = EvalSets.scan(synthetic_root, PROTOCOL, reconstructor=identity)
    report = evaluate(sets, PROTOCOL, models, seeds=[0], cache_dir=cache / "eval", progress=False)
    assert identity.batches == 1
    assert abs(report["rfvd"]) < 1e-2 and abs(report["rfad_aisfx"]) < 1e-2
    assert report["oracle_class_agreement"] == report["oracle_class_agreement_real"] == 1.0
    assert "| rfvd |" in markdown_table(report)


@pytest.mark.slow
def test_generated_videos_without_audio_skip_audio_metrics(
    models: EvalModels, synthetic_root: Path, cache: Path, tmp_path: Path
):
    generated = tmp_path / "generated"
    for name in ("a", "b"):
        write_test_video(generated / f"{name}.mp4", seconds=2.0, audio=None)
    write_test_video(generated / "short.mp4", seconds=1.0, audio=tone(1.0, 44100))  # 10 frames < 16
    sets = EvalSets.scan(synthetic_root, PROTOCOL, generated_root=generated)
    report = evaluate(sets, PROTOCOL, models, seeds=[0, 1], cache_dir=cache / "eval", progress=False)
    assert report["fvd"] > 0 and "fvd" in report["std"]
    assert report["fad_aisfx"] is None and report["av_align"] is None
    assert report["generated_clips"] == 2 and report["generated_clips_with_audio"] == 0
    notes = "\n".join(report["notes"])
    assert "fad_aisfx skipped" in notes
    assert "generated: 2 file(s) have no audio stream" in notes
    assert "generated: 1 file(s) skipped, shorter than 16 frames at 10 fps: short.mp4" in notes
    assert "| fad_aisfx | skipped |" in markdown_table(report)


@pytest.mark.slow
def test_tool_compares_two_synthetic_folders_offline(synthetic_root: Path, tmp_path: Path):
    generated = tmp_path / "generated"
    write_synthetic_dataset(generated, num_clips=2, seed=1, cfg=SyntheticConfig(duration=1.6), progress=False)
    out = tmp_path / "eval" / "report.json"
    args = (
        f"--generated {generated} --real {synthetic_root} --num-clips 2 --resolution 64 --out {out}".split()
    )
    first = run_tool_in_process("eval_fvd_fad.py", *args)
    report = json.loads(out.read_text())
    for key in ("fvd", "kvd", "fad_aisfx", "av_align", "oracle_class_agreement", "oracle_onset_error_frames"):
        assert isinstance(report[key], float), key
    assert report["oracle_class_agreement"] == 1.0
    assert report["generated_clips"] == report["real_clips"] == 2
    assert report["protocol"]["fad_backends"]["aisfx"]["comparable_to_published_fad"] is False
    assert any("NOT comparable to published FAD" in note for note in report["notes"])
    table = out.with_suffix(".md").read_text()
    assert "| fvd |" in table and "| fad_aisfx |" in table and "| av_align |" in table
    assert table in first.stdout and "generated (seed 0)" in first.stderr  # printed, with progress bars

    second = run_tool_in_process("eval_fvd_fad.py", *args)
    again = json.loads(out.read_text())
    assert again["inputs"]["real"]["features_from_cache"] == [True] and "real (seed 0)" not in second.stderr
    assert again["fvd"] == pytest.approx(report["fvd"])


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tool():
    return load_tool("eval_fvd_fad.py")


def run_main(tool, capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_folder_without_readable_video(tool, capsys, synthetic_root: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    error = run_main(tool, capsys, "--generated", str(empty), "--real", str(synthetic_root))
    assert "no readable video clip in the generated folder" in error and "no video file found" in error
    (empty / "broken.mp4").write_bytes(b"\x00" * 2048)
    error = run_main(tool, capsys, "--generated", str(empty), "--real", str(synthetic_root))
    assert "1 video file(s) found" in error and "unreadable" in error and "broken.mp4" in error
    error = run_main(tool, capsys, "--generated", str(synthetic_root), "--real", str(tmp_path / "missing"))
    assert "real folder" in error and "does not exist" in error


def test_clips_shorter_than_16_frames(tool, capsys, synthetic_root: Path, tmp_path: Path):
    write_test_video(tmp_path / "short" / "clip.mp4", seconds=1.2, audio=tone(1.2, 44100))
    error = run_main(tool, capsys, "--generated", str(tmp_path / "short"), "--real", str(synthetic_root))
    assert "1 shorter than 16 frames at 10 fps: clip.mp4" in error and "at least 16 frames" in error


def test_argument_errors(tool, capsys, synthetic_root: Path):
    assert "either --generated" in run_main(tool, capsys, "--real", str(synthetic_root))
    error = run_main(
        tool,
        capsys,
        "--generated",
        str(synthetic_root),
        "--real",
        str(synthetic_root),
        "--fad-backends",
        "clap",
    )
    assert "unknown FAD backend(s) ['clap']" in error
    error = run_main(tool, capsys, "--generated", str(synthetic_root), "--real", "dataset=nonexistent")
    assert "nonexistent" in error


@pytest.mark.slow
def test_tool_evaluates_the_round_trip_of_an_autoencoder_run(
    tool, capsys, monkeypatch, tiny_ae_run: Path, synthetic_root: Path, tmp_path: Path
):
    error = run_main(tool, capsys, "--recon", str(tmp_path / "absent"), "--real", str(synthetic_root))
    assert "does not exist" in error and "checkpoints/step_*" in error

    def few_steps(checkpoint, device, precision):  # the run's own 50 decoding steps take minutes on CPU
        reconstructor = load_reconstructor(checkpoint, device, precision)
        reconstructor.steps = 2
        return reconstructor

    monkeypatch.setattr(tool, "load_reconstructor", few_steps)
    out = tmp_path / "recon.json"
    assert (
        tool.main(
            f"--recon {tiny_ae_run} --real {synthetic_root} --num-clips 2 --resolution 64 --device cpu "
            f"--out {out}".split()
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["rfvd"] > 1 and isinstance(report["rfad_aisfx"], float)  # an untrained autoencoder
    assert report["inputs"]["generated"] == "autoencoder round trip of the real clips"


def test_conditions_that_do_not_match_the_folder_are_reported(tmp_path):
    from mmldm_data.evaluation.report import condition_notes
    from mmldm_data.evaluation.sources import ClipRef, ClipSource
    from mmldm_data.metrics.oracle import Condition

    windows = [ClipRef(tmp_path / name, 0, True) for name in ("a2v_0000.mp4", "a2v_0001.mp4")]
    source = ClipSource(tmp_path, windows, files=2, skipped={}, fingerprint="")
    labelled = {"a2v_0000.mp4": Condition("a2v", 0), "a2v_0001.mp4": Condition("a2v", 1)}
    assert condition_notes(labelled, source) == []
    stale = {"a2v_0000.mp4": Condition("a2v", 0), "a2v_0002.mp4": Condition("a2v", 2)}
    notes = condition_notes(stale, source)
    assert "names 1 file(s) that are not in the folder (a2v_0002.mp4)" in notes[0]
    assert "1 file(s) have no entry in conditions.json (a2v_0001.mp4)" in notes[1]
