"""Shared fixtures. Tests run offline: no hub downloads, W&B disabled, caches in temp folders."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each keeps to one thread (tools it launches inherit it),
    # so two workers fill two cores instead of four threads fighting over them.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


# The files that take longest in `make test` (seconds in a run of the whole suite on 2 cores, 2026-12-03),
# collected first: pytest-xdist hands files to the workers in collection order (the Makefile turns off
# its reordering by test count), so with these first the two workers end on short files together.
LONGEST_FILES = (
    "test_sweep_runs.py",  # 136
    "test_end_to_end.py",  # 127
    "test_learning.py",  # 112
    "test_distributed.py",  # 99
    "test_sweep_ablation.py",  # 80
    "test_train_ae.py",  # 68
    "test_table1.py",  # 62
    "test_eval_tool.py",  # 49
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: other files keep their order


@pytest.fixture(scope="session", autouse=True)
def _config_schemas():
    """Every config group's dataclass registered with Hydra, as the tools do before composing conf/."""
    from mmldm_dit.config import register_schemas

    register_schemas()


def preset(group: str, name: str, **overrides):
    """The typed dataclass of conf/<group>/<name>.yaml with some fields replaced, e.g.
    preset("ae", "tiny", resolution=32)."""
    from mmldm_data import config

    return config.preset(REPO_ROOT / "conf", group, name, **overrides)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "mmldm-cache"
    monkeypatch.setenv("MMLDM_CACHE", str(cache))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.getbasetemp() / "wandb"))


@pytest.fixture
def plain_single_thread_cpu():
    """oneDNN builds a kernel per new convolution shape (about a second each on this CPU); tests
    that see many shapes once run faster on the plain kernels, and small tensors on one thread."""
    import torch

    enabled, threads = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    yield
    torch.backends.mkldnn.enabled = enabled
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic sounding-video dataset (6 classes x 2 clips, 64^2, 3.2 s), made once."""
    from mmldm_data.synthetic import SyntheticConfig, write_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, num_clips=12, seed=0, cfg=SyntheticConfig(), progress=False)
    return root


def run_tool(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run tools/<script> with this interpreter, as a user would from the repository root."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def run_tool_in_process(script: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`run_tool` without starting an interpreter (seconds with torch and Hydra), for runs that train
    nothing: tools/<script> as __main__ with these arguments; its exit status, stdout and stderr as the
    interpreter would give them. What a tool sets for its process (Hydra's global state, the root
    logger, torch's threads and oneDNN) is put back for the tests that follow."""
    import contextlib
    import io
    import logging
    import runpy
    import traceback

    import torch
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    path = REPO_ROOT / "tools" / script
    stdout, stderr = io.StringIO(), io.StringIO()
    argv, cwd = sys.argv, Path.cwd()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads, mkldnn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    returncode = 0
    try:
        sys.argv = [str(path), *args]
        os.chdir(REPO_ROOT)
        torch.backends.mkldnn.enabled = True  # as a new process starts (plain_single_thread_cpu turns it off)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as exit:
                if isinstance(exit.code, str):
                    print(exit.code, file=sys.stderr)
                returncode = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
            except Exception:
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        for handler in set(root.handlers) - set(handlers):
            handler.close()
        root.handlers[:] = handlers  # Hydra's logging config replaced them (pytest's among them)
        root.setLevel(level)
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
    result = subprocess.CompletedProcess([script, *args], returncode, stdout.getvalue(), stderr.getvalue())
    if check and returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({returncode}):\n{result.stderr}")
    return result


def load_tool(script: str) -> ModuleType:
    """Import tools/<script> as a module, once per session."""
    name = f"tool_{Path(script).stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / script)
        module = importlib.util.module_from_spec(spec)
        # Registered before it runs: dataclasses and typed configs look their module up by name.
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# The generator stage's tests need a trained autoencoder only for its layout and shapes: a random
# tiny one (32^2 frames, 2-block VAE -> z_v 8x8x8, z_a 8x4x4: the tiny DiT's latents) written as a
# tools/train_ae.py run.
TINY_AE_DATASET = {
    "resolution": 32,
    "mel": {"image_size": 32},
    "window_stride": 8,
    "val_fraction": 0.2,
}  # as conf/dataset/synthetic.yaml


@pytest.fixture(scope="session")
def tiny_ae_run(synthetic_root, tmp_path_factory) -> Path:
    import torch

    from mmldm_ae.autoencoder import MultiModalAutoencoder
    from mmldm_ae.engine.trainer import TrainConfig, Trainer
    from mmldm_ae.pipeline import AutoencoderPipeline
    from mmldm_ae.train_ae import AETrainingTask
    from mmldm_ae.vae import VAEConfig, build_vae
    from mmldm_data.config import DatasetConfig, to_plain_dict, to_typed
    from mmldm_data.dataset import SoundingVideoDataset

    root = tmp_path_factory.mktemp("ae-run")
    torch.manual_seed(0)
    build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32])).save_pretrained(root / "vae")
    vae_config = VAEConfig(preset="tiny", weights=str(root / "vae"))
    dataset = to_typed(DatasetConfig, {"data_root": str(synthetic_root), **TINY_AE_DATASET})
    class_names = SoundingVideoDataset(dataset).class_names
    ae_config = preset("ae", "tiny", resolution=32, vae_downsample=2)
    model = MultiModalAutoencoder(ae_config, num_classes=len(class_names))
    pipeline = AutoencoderPipeline(model, build_vae(vae_config), dataset, class_names)
    architecture = {"num_classes": len(class_names), "class_names": class_names}
    task = AETrainingTask(pipeline, None, {}, architecture)
    run_config = {
        "ae": to_plain_dict(ae_config),
        "vae": to_plain_dict(vae_config),
        "dataset": to_plain_dict(dataset),
    }
    Trainer(task, [], TrainConfig(), root / "run", run_config=run_config).save_checkpoint()
    return root / "run"


@pytest.fixture(scope="session")
def tiny_dit_cache(tiny_ae_run, synthetic_root, tmp_path_factory) -> Path:
    """The DiT latent cache of `tiny_ae_run` over `synthetic_root` (36 windows), built once."""
    from mmldm_ae.pipeline import load_autoencoder
    from mmldm_data.config import DatasetConfig, to_typed
    from mmldm_data.dataset import SoundingVideoDataset
    from mmldm_dit.latents import build_dit_latent_cache

    dataset = SoundingVideoDataset(
        to_typed(DatasetConfig, {"data_root": str(synthetic_root), **TINY_AE_DATASET})
    )
    out_dir = tmp_path_factory.mktemp("dit-latents") / "cache"
    return build_dit_latent_cache(
        dataset, load_autoencoder(tiny_ae_run), out_dir, batch_size=8, progress=False
    )


@pytest.fixture(scope="session")
def tiny_model_folder(tiny_ae_run, tmp_path_factory) -> Path:
    """A model folder of `MMLDMPipeline.save_pretrained` (svg, a2v, v2a): a random tiny joint DiT over
    `tiny_ae_run`, made without training, for what needs a loadable model rather than a good one."""
    import torch

    from mmldm_ae.pipeline import load_autoencoder
    from mmldm_dit import MMLDMPipeline
    from mmldm_dit.dit import MMDiT
    from mmldm_dit.generate import TrainedDiT
    from mmldm_dit.latents import LatentStats

    torch.manual_seed(0)
    dit = TrainedDiT(
        MMDiT(preset("dit", "tiny")).eval(),
        LatentStats(audio_mean=0.0, audio_std=1.0, video_mean=0.0, video_std=1.0),
        load_autoencoder(tiny_ae_run),
        latent_cache=None,
        checkpoint=tiny_ae_run,
    )
    pipe = MMLDMPipeline(dit, info={"vae_preset": "tiny"})
    return pipe.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tiny_vae_folder(tmp_path_factory) -> Path:
    """A random 2-block tiny KL-VAE folder (32^2 -> 4x16x16), as stage 0 would export it."""
    from mmldm_ae.vae import VAEConfig, build_vae

    folder = tmp_path_factory.mktemp("vae") / "vae"
    build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32])).save_pretrained(folder)
    return folder
