"""make demo / make synth-bench (tools/demo.py) at a few steps per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool, run_tool, run_tool_in_process
from media_factory import stream_seconds
from omegaconf import OmegaConf

from mmldm_data.config import ConfigError, to_typed

demo = load_tool("demo.py")

# Every stage at a handful of steps, with the demo's key-frame latent (conf/demo.yaml): checks the wiring,
# not the quality.
QUICK = [
    "num_clips=6",
    "heldout_clips=6",
    "finetune_vae=true",  # trains assets/tiny_vae further (copying it as it is: tested below)
    "train_vae=['train=vae_tiny','train.max_steps=2','train.log_every=1','train.sample_at_end=false']",
    "train_ae=['train=ae_tiny','train.max_steps=2','train.log_every=1','dataset.window_stride=8','train.sample_at_end=false','ae.video_latent=key_frames','ae.num_key_frames=8','ae.latent_channels=16','dataset.key_frame_indices=[0,2,4,6,8,10,12,14]']",
    "train_dit=['train=dit_tiny','train.max_steps=2','train.log_every=1','train.sample_at_end=false','dit.video_latent_channels=16','dit.audio_latent_channels=16','dataset.key_frame_indices=[0,2,4,6,8,10,12,14]']",
    "train_dit_long=['train=dit_tiny','train.max_steps=2','train.log_every=1','train.sample_at_end=false','dit.video_latent_channels=16','dit.audio_latent_channels=16','dataset.key_frame_indices=[0,2,4,6,8,10,12,14]']",
    "sampling.steps=2",
    "sampling.ae_steps=2",
    "sampling.long_clips=2",
    "sampling.per_class=1",
    "sampling.svg_samples=2",
    "sampling.vocoder=griffinlim",
    "evaluation.real_clips=3",
    "evaluation.reference_clips=2",
]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_every_stage_and_reuses_them(tmp_path):
    out = tmp_path / "demo"
    first = run_tool("demo.py", f"out={out}", f"results_json={tmp_path / 'results.json'}", *QUICK)
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["out"] == str(out)

    for name in ("report.md", "metrics.json", "samples/contact_sheet.png", "previews/contact_sheet.png"):
        assert (out / name).is_file(), name
    for task in demo.SAMPLED_TASKS:
        assert (out / "samples" / f"spectrogram_{task}.png").is_file()
        videos = sorted((out / "samples" / task).glob("*.mp4"))
        assert videos, task
        video_seconds, audio_seconds, frames = stream_seconds(videos[0])
        assert audio_seconds == pytest.approx(video_seconds, abs=0.05), task
        assert frames == (32 if task.needs_long_model else 16), task
    conditions = json.loads((out / "samples" / "a2v" / "conditions.json").read_text())
    assert len(conditions) == 6 and {c["task"] for c in conditions.values()} == {"a2v"}

    metrics = json.loads((out / "metrics.json").read_text())
    reports = metrics["reports"]
    assert set(reports) == {"svg", "a2v", "v2a", "real", "shuffled", "swapped"}
    # Real held-out clips read correctly by the oracles: the references are what they claim.
    assert reports["real"]["oracle_class_agreement"] == 1.0
    assert reports["real"]["oracle_onset_error_frames"] <= 1.0
    assert reports["swapped"]["av_align"] is not None
    assert {row["label"] for row in metrics["quality"]} >= {"a2v oracle accuracy", "v2a oracle accuracy"}
    report = (out / "report.md").read_text()
    assert "| a2v oracle accuracy |" in report and "| vae | 2 from assets/tiny_vae |" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quality"] == metrics["quality"] and results["training"] == metrics["training"]
    # The demo ends by exporting its model: a folder MMLDMPipeline loads, with both DiTs.
    model = Path(metrics["model"])
    assert model.is_relative_to(out) and (model / "model_index.json").is_file()
    assert (model / "dit" / "model.safetensors").is_file() and (
        model / "dit_long" / "model.safetensors"
    ).is_file()

    # The FVD floor of its VAE, on the demo's own folders.
    floor = run_tool_in_process(
        "vae_fvd.py",
        str(out / "runs" / "vae" / "vae"),
        str(out / "heldout"),
        str(out / "synthetic"),
        *("--clips", "2", "--real-clips", "3", "--out", str(tmp_path / "vae_fvd")),
    )
    sets = json.loads(floor.stdout.strip().splitlines()[-1])["sets"]
    assert set(sets) == {"real", "shuffled", "vae"} and all(s["generated_clips"] == 2 for s in sets.values())
    assert len(list((tmp_path / "vae_fvd" / "vae").glob("*.mp4"))) == 2

    second = run_tool_in_process(
        "demo.py", f"out={out}", f"results_json={tmp_path / 'results.json'}", *QUICK
    )  # reuses every stage: nothing trains
    for stage in (
        "synthetic",
        "heldout",
        "previews",
        "vae",
        "ae",
        "dit",
        "dit_long",
        "samples",
        "evaluation",
        "model",
    ):
        assert f"[{stage}] up to date" in second.stderr, stage
    assert "running" not in second.stderr


def test_changed_settings_rerun_a_stage_and_an_interrupted_one_resumes(tmp_path):
    calls = []

    def work(folder):
        calls.append(folder)
        (folder / "progress").touch()
        return {"value": len(calls)}

    folder = tmp_path / "stage"
    first = demo.run_stage(folder, {"steps": 1}, work)
    assert demo.run_stage(folder, {"steps": 1}, work) == first and len(calls) == 1
    assert demo.run_stage(folder, {"steps": 2}, work)["key"] != first["key"] and len(calls) == 2

    def interrupted(folder):
        (folder / "checkpoint").touch()
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo.run_stage(folder, {"steps": 3}, interrupted, resumable=True)
    resumed = []
    demo.run_stage(
        folder, {"steps": 3}, lambda f: resumed.append((f / "checkpoint").is_file()) or {}, resumable=True
    )
    assert resumed == [True]  # the trainer would find its checkpoint
    with pytest.raises(KeyboardInterrupt):
        demo.run_stage(folder, {"steps": 4}, interrupted, resumable=True)
    demo.run_stage(
        folder, {"steps": 5}, lambda f: resumed.append((f / "checkpoint").is_file()) or {}, resumable=True
    )
    assert resumed == [True, False]  # other settings start over


def test_quality_table_marks_the_bars():
    reports = {
        "svg": {"oracle_class_agreement": 0.9, "oracle_onset_error_frames": 2.0, "fvd": 100.0},
        "a2v": {"oracle_a2v_accuracy": 0.5, "oracle_a2v_given_accuracy": 1.0},
        "real": {"oracle_class_agreement": 1.0, "fvd": 10.0},
    }
    rows, table = demo.quality_table(reports)
    by_label = {row["label"]: row for row in rows}
    assert by_label["joint (svg) cross-modal class agreement"]["passed"] is True
    assert by_label["joint (svg) cross-modal class agreement"]["real_floor"] == 1.0
    assert by_label["a2v oracle accuracy"]["passed"] is False
    assert by_label["median onset-to-impact error (frames), svg"]["passed"] is False
    assert (
        by_label["v2a oracle accuracy"]["value"] is None and by_label["v2a oracle accuracy"]["passed"] is None
    )
    assert "| a2v oracle accuracy | 0.5 | n/a | >= 0.8 | **no** |" in table
    ceiling = by_label["a2v: given sound read right as decoded with the sample"]
    assert ceiling["value"] == 1.0 and ceiling["bar"] is None and ceiling["passed"] is None
    assert by_label["FVD vs training clips, svg"]["passed"] is None  # no shuffled set: no bar

    reports["shuffled"] = {"fvd": 80.0}
    demo_bars = demo.QualityBars(svg_agreement=0.95, a2v_accuracy=0.5, onset_error_frames=None)
    by_label = {row["label"]: row for row in demo.quality_table(reports, demo_bars)[0]}
    assert by_label["joint (svg) cross-modal class agreement"]["passed"] is False
    assert by_label["a2v oracle accuracy"]["passed"] is True
    assert by_label["median onset-to-impact error (frames), svg"]["bar"] is None
    assert by_label["FVD vs training clips, svg"]["bar"] == "< 80"
    assert by_label["FVD vs training clips, svg"]["passed"] is False  # 100 is not below the shuffled 80


def test_pretrained_vae_stage_copies_the_folder_and_reruns_when_it_changes(tmp_path):
    from mmldm_ae.vae import VAEConfig, build_vae, load_vae

    source = tmp_path / "pretrained"
    torch.manual_seed(0)
    build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32])).save_pretrained(source)
    folder = tmp_path / "runs" / "vae"
    result = demo.run_stage(folder, *demo.pretrained_vae_stage(source))
    assert result["pretrained"] == str(source) and result["step"] == 0
    assert (
        load_vae(folder / "vae", preset="tiny").fingerprint() == load_vae(source, preset="tiny").fingerprint()
    )
    assert demo.run_stage(folder, *demo.pretrained_vae_stage(source))["key"] == result["key"]  # reused
    torch.manual_seed(1)
    build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32])).save_pretrained(source)
    assert demo.run_stage(folder, *demo.pretrained_vae_stage(source))["key"] != result["key"]


def test_the_shipped_tiny_vae_loads_as_the_demo_uses_it():
    from mmldm_ae.vae import load_vae

    default = OmegaConf.load(demo.CONF_DIR / "demo.yaml").pretrained_vae
    vae = load_vae(demo.CONF_DIR.parent / default, preset="tiny")  # make demo runs from the repository root
    assert vae.latent_channels == 4 and vae.downsample == 4
    assert vae.latent_shape(64) == (4, 16, 16)


@pytest.mark.slow
def test_bad_end_to_end_config_names_the_key():
    with pytest.raises(ConfigError, match="sampling.steps"):
        to_typed(demo.EndToEndConfig, {"sampling": {"steps": 0}})
    with pytest.raises(ConfigError, match="num_clips"):
        to_typed(demo.EndToEndConfig, {"num_clips": 2})
    with pytest.raises(ConfigError, match="nonsense"):
        to_typed(demo.EndToEndConfig, {"nonsense": 1})
    result = run_tool_in_process("demo.py", "sampling.guidance=-1", check=False)
    assert result.returncode != 0 and "sampling.guidance" in result.stderr
    with pytest.raises(ConfigError, match="pretrained_vae: nowhere is not a VAE folder"):
        to_typed(demo.EndToEndConfig, {"pretrained_vae": "nowhere"})
    with pytest.raises(ConfigError, match="finetune_vae=true needs a pretrained_vae"):
        to_typed(demo.EndToEndConfig, {"finetune_vae": True})
