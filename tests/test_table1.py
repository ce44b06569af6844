"""`make table1`: the paper's Table 1 layout from the runs the tool finds, or trains where missing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import load_tool
from test_dit_init_from import save_dit_run

from mmldm_ae.engine.checkpoint import newest_valid_checkpoint
from mmldm_ae.pipeline import load_autoencoder

table1 = load_tool("table1.py")

QUICK = [
    "sampling.samples=2",
    "sampling.batch_size=2",
    "sampling.steps=2",
    "sampling.ae_steps=2",
    "sampling.vocoder=griffinlim",
    "evaluation.num_clips=2",
]


def test_layout_is_the_papers():
    assert table1.layout([64, 256]) == [
        ("", "gt", 64),
        ("", "gt", 256),
        (table1.VIDEO, "video", 64),
        (table1.VIDEO, "video", 256),
        (table1.AUDIO, "audio", None),
        (table1.JOINT, "a2v", 64),
        (table1.JOINT, "v2a", None),
        (table1.JOINT, "svg", 64),
        (table1.JOINT, "a2v", 256),
        (table1.JOINT, "svg", 256),
    ]


def test_a_run_without_checkpoint_is_trained_there_and_a_found_one_is_kept(tiny_ae_run, tmp_path):
    pipeline = load_autoencoder(tiny_ae_run)
    launched = []

    def train(cfg):  # what train_dit_from_config would leave: a checkpoint in cfg.run_dir
        launched.append(cfg)
        save_dit_run(pipeline, tiny_ae_run, Path(cfg.run_dir), modalities=list(cfg.dit.modalities))

    run = str(tmp_path / "dit-video")
    first = table1.find_or_train(run, "train_dit", ["dit.modalities=[video]"], train)
    assert [cfg.run_dir for cfg in launched] == [run] and launched[0].dit.modalities == ["video"]
    assert first == newest_valid_checkpoint(Path(run))
    assert table1.find_or_train(run, "train_dit", [], train) == first and len(launched) == 1


@pytest.mark.slow
def test_tiny_table1_samples_evaluates_and_reuses(
    synthetic_root, tiny_ae_run, tiny_dit_cache, tmp_path, capsys
):
    pipeline = load_autoencoder(tiny_ae_run)
    runs = tmp_path / "runs"
    for name, modalities in (("dit", ["audio", "video"]), ("dit-video", ["video"]), ("dit-audio", ["audio"])):
        save_dit_run(pipeline, tiny_ae_run, runs / name, tiny_dit_cache, modalities=modalities)
    out = tmp_path / "table1"
    argv = [
        "--config-name",
        "table1_tiny",
        "dataset=synthetic",
        f"data_root={synthetic_root}",
        f"out={out}",
        f"ae_run={tiny_ae_run}",
        f"dit_run={runs / 'dit'}",
        *QUICK,
    ]
    assert table1.main(argv) == 0
    printed = capsys.readouterr()
    assert "| Method | Resolution | Sampler | FVD | KVD | FAD (aisfx) |" in printed.out
    assert printed.err.count("found ") == 4 and "training" not in printed.err
    with open(out / "table1.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["method"], row["resolution"]) for row in rows] == [
        ("Ground Truth", "64^2"),
        ("Ground Truth", "256^2"),
        ("MM-LDM-v", "64^2"),
        ("MM-LDM-v", "256^2"),
        ("MM-LDM-a", "-"),
        ("MM-LDM-a2v", "64^2"),
        ("MM-LDM-v2a", "-"),
        ("MM-LDM-svg", "64^2"),
        ("MM-LDM-a2v", "256^2"),
        ("MM-LDM-svg", "256^2"),
    ]
    for row in rows:  # a number exactly where the paper prints one
        shown = {metric: row[metric] != "" for metric in ("fvd", "kvd", "fad")}
        expected = {
            "Ground Truth": (True, True, True),
            "MM-LDM-v": (True, True, False),
            "MM-LDM-a": (False, False, True),
            "MM-LDM-a2v": (True, True, False),
            "MM-LDM-v2a": (False, False, True),
            "MM-LDM-svg": (True, True, True),
        }[row["method"]]
        assert tuple(shown.values()) == expected, row
        assert all(float(row[m]) == float(row[m]) for m in shown if shown[m])  # finite numbers
    by_row = {(row["method"], row["resolution"]): row for row in rows}
    # Frames at another resolution give other video features; the sound is the same.
    assert by_row[("MM-LDM-svg", "64^2")]["fvd"] != by_row[("MM-LDM-svg", "256^2")]["fvd"]
    fad_64, fad_256 = (float(by_row[("MM-LDM-svg", r)]["fad"]) for r in ("64^2", "256^2"))
    assert fad_64 == pytest.approx(fad_256, rel=1e-6)  # the same sound, features read twice

    assert table1.main(argv) == 0  # a second call finds every run, sample and evaluation
    again = capsys.readouterr()
    assert "up to date" in again.err and "sampling" not in again.err and "evaluating" not in again.err
    assert again.out.split("\n{")[0] == printed.out.split("\n{")[0]
