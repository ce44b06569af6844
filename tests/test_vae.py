"""Stage 0: the KL-VAE wrapper, its loaders (diffusers folder, original LDM/SD checkpoint) and losses."""

from __future__ import annotations

import json
import re
import socket

import pytest
import torch
from conftest import load_tool, preset, run_tool_in_process
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

from mmldm_ae.vae import (
    KLVAE,
    PatchDiscriminator,
    VAEConfig,
    VAELoadError,
    autoencoder_config,
    build_vae,
    hinge_discriminator_loss,
    load_vae,
    patch_discriminator_loss,
    vae_losses,
)
from mmldm_data.config import ConfigError, to_typed

TEST_WIDTHS = [16, 32]  # 2 blocks: factor 2, 32^2 -> 4x16x16


def tiny_vae(**overrides) -> KLVAE:
    torch.manual_seed(0)
    return build_vae(VAEConfig(preset="tiny", block_out_channels=TEST_WIDTHS, **overrides))


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def to_ldm_key(key: str, num_blocks: int) -> str:
    """diffusers -> original LDM naming, written independently of the loader's converter."""
    key = re.sub(
        r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
        lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.{'block' if m[2] == 'resnets' else 'upsample'}.",
        key,
    )
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    for new, old in (
        ("group_norm", "norm"),
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "proj_out"),
    ):
        key = key.replace(f".mid_block.attentions.0.{new}.", f".mid.attn_1.{old}.")
    key = key.replace(".conv_shortcut.", ".nin_shortcut.")
    return key.replace(".conv_norm_out.", ".norm_out.")


def ldm_state_dict(vae: KLVAE) -> dict[str, torch.Tensor]:
    """The state dict an original LDM AutoencoderKL of the same shape would have (1x1-conv attention)."""
    blocks = len(vae.model.config.block_out_channels)
    state = {}
    for key, tensor in vae.model.state_dict().items():
        if ".attentions." in key and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        state[to_ldm_key(key, blocks)] = tensor.clone()
    return state


def test_presets_and_shapes():
    vae = tiny_vae()
    assert (vae.latent_channels, vae.downsample, vae.scale) == (4, 2, 0.18215)
    assert vae.latent_shape(32) == (4, 16, 16)
    sd = autoencoder_config("sd")
    assert sd["block_out_channels"] == (128, 256, 512, 512) and sd["layers_per_block"] == 2
    with torch.device("meta"):  # the paper VAE's shapes without allocating 84M parameters
        paper = KLVAE(AutoencoderKL(**sd))
        latents = paper.encode(torch.empty(1, 3, 256, 256))
    assert (paper.downsample, paper.latent_shape(256), tuple(latents.shape)) == (
        8,
        (4, 32, 32),
        (1, 4, 32, 32),
    )
    assert build_vae("tiny").latent_shape(64) == (4, 16, 16)


def test_encode_scales_the_posterior_and_decode_inverts_it():
    vae = tiny_vae(chunk_size=2).eval()
    x = images()
    with torch.no_grad():
        posterior = vae.model.encode(x).latent_dist
        z = vae.encode(x)
        assert z.shape == (3, 4, 16, 16)
        torch.testing.assert_close(z, posterior.mode() * 0.18215)
        first = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        again = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        assert torch.equal(first, again) and not torch.equal(first, z)
        decoded = vae.decode(z)
        torch.testing.assert_close(decoded, vae.model.decode(posterior.mode()).sample)  # chunked == whole
    assert decoded.shape == x.shape
    with pytest.raises(ValueError, match="divisible by 2"):
        vae.encode(torch.zeros(1, 3, 31, 31))


def test_decode_backpropagates_into_its_input_with_frozen_weights():
    vae = tiny_vae().freeze()
    z = torch.randn(2, 4, 16, 16, requires_grad=True)
    vae.decode(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in vae.parameters())


def test_diffusers_folder_round_trip(tmp_path):
    vae = tiny_vae().eval()
    vae.fit_scale(images(4))
    vae.save_pretrained(tmp_path / "pipeline" / "vae")  # a pipeline folder layout, vae/ inside
    loaded = load_vae(tmp_path / "pipeline").eval()
    assert loaded.scale == pytest.approx(vae.scale)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images()), vae.encode(images()))
    assert loaded.fingerprint() == vae.fingerprint()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_original_single_file_checkpoint(tmp_path, suffix):
    source = tiny_vae().eval()
    ldm = ldm_state_dict(source)
    path = tmp_path / f"vae{suffix}"
    if suffix == ".ckpt":  # an SD checkpoint as Lightning writes it: VAE under first_stage_model.
        nested = {f"first_stage_model.{k}": v for k, v in ldm.items()}
        nested["loss.logvar"] = torch.zeros(())
        torch.save({"state_dict": nested, "global_step": 1}, path)
    else:
        save_file(ldm, path)
    loaded = build_vae(VAEConfig(preset="tiny", block_out_channels=TEST_WIDTHS, weights=str(path))).eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x)), source.decode(source.encode(x)))
    # The converter agrees with diffusers' own (which silently skips keys it does not know).
    reference = convert_ldm_vae_checkpoint(ldm, source.model.config)
    assert set(reference) == set(loaded.model.state_dict())


def test_bad_weights_name_the_file(tmp_path):
    with pytest.raises(VAELoadError, match=r"nowhere\.ckpt.*sd-vae-ft-mse"):
        load_vae(tmp_path / "nowhere.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VAELoadError, match="without an AutoencoderKL config.json"):
        load_vae(tmp_path / "empty")
    ldm = ldm_state_dict(tiny_vae())
    del ldm["decoder.conv_out.bias"]
    ldm["decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.safetensors"
    save_file(ldm, path)
    with pytest.raises(VAELoadError) as error:
        build_vae(VAEConfig(preset="tiny", block_out_channels=TEST_WIDTHS, weights=str(path)))
    message = str(error.value)
    assert (
        "broken.safetensors" in message
        and "decoder.extra.weight" in message
        and "decoder.conv_out.bias" in message
    )
    save_file(ldm_state_dict(tiny_vae()), tmp_path / "two_blocks.safetensors")
    with pytest.raises(VAELoadError, match="shape mismatches"):  # a valid VAE, but not the preset's shape
        load_vae(tmp_path / "two_blocks.safetensors", preset="tiny")


def test_loading_never_touches_the_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a VAE")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", refuse)
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "folder")
    save_file(ldm_state_dict(vae), tmp_path / "vae.safetensors")
    load_vae(tmp_path / "folder")
    build_vae(
        VAEConfig(preset="tiny", block_out_channels=TEST_WIDTHS, weights=str(tmp_path / "vae.safetensors"))
    )


@pytest.mark.parametrize("train_encoder", [True, False])
def test_stage0_losses(train_encoder):
    vae = tiny_vae().train()
    if not train_encoder:
        vae.freeze_encoder()
    discriminator = PatchDiscriminator(channels=16, num_layers=2)
    x = images(2)
    losses = vae_losses(vae, x, discriminator, adv_weight=0.5, kl_weight=1e-6, train_encoder=train_encoder)
    assert {"loss", "rec_l1", "rec_mse", "kl", "adv_g", "adv_scale"} <= losses.keys()
    assert all(torch.isfinite(v).all() for v in losses.values())
    losses["loss"].backward()
    encoder_grads = [p.grad for p in vae.model.encoder.parameters()]
    if train_encoder:
        assert all(g is not None for g in encoder_grads) and sum(g.abs().sum() for g in encoder_grads) > 0
    else:
        assert all(g is None for g in encoder_grads)
    assert vae.model.decoder.conv_out.weight.grad.abs().sum() > 0

    d = patch_discriminator_loss(discriminator, x, losses["reconstruction"])
    assert torch.isfinite(d["loss"]) and d["loss"].requires_grad
    assert "adv_g" not in vae_losses(vae, x, discriminator, adv_weight=0.0)  # before disc_start


def test_hinge_loss_and_patch_logits():
    assert hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert hinge_discriminator_loss(torch.zeros(4), torch.zeros(4)) == 1
    assert PatchDiscriminator()(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 6, 6)


def test_config_files_load():
    for name in ("sd", "tiny"):
        assert preset("vae", name).preset == name
    assert preset("vae", "sd") == VAEConfig()  # the authors' SD VAE is the dataclass default
    assert preset("vae", "tiny").stage0.train_encoder
    with pytest.raises(ConfigError, match="vae.preset"):
        to_typed(VAEConfig, {"preset": "huge"})


def test_fine_tuning_a_decoder_needs_pretrained_weights(tmp_path):
    from conftest import REPO_ROOT

    from mmldm_ae.train_vae import train_vae_from_config
    from mmldm_data.config import compose

    cfg = compose(REPO_ROOT / "conf", "train_vae", ["vae=sd", "train=vae_sd", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="vae.weights is not set: pass vae.weights="):
        train_vae_from_config(cfg)
    assert not any(tmp_path.iterdir())  # refused before any run file is written


class _IdentityVAE:
    """Encodes to the frames themselves: a VAE that loses nothing."""

    def encode(self, frames, sample=False):
        return frames

    def decode(self, z):
        return z


@pytest.mark.slow  # the tool end to end
def test_vae_oracle_tool(synthetic_root, tmp_path):
    """tools/vae_oracle.py: a lossless VAE reads every class right (the oracle's class ids are not the
    dataset's folder order), a random one runs end to end with its checkpoints, a foreign folder fails."""
    from mmldm_data.config import compose, dataset_config_from
    from mmldm_data.dataset import SoundingVideoDataset

    tool = load_tool("vae_oracle.py")
    config = compose(tool.CONF_DIR, "data", ["dataset=synthetic", f"data_root={synthetic_root}"])
    dataset = SoundingVideoDataset(dataset_config_from(config), return_all_frames=True)
    indices = list(range(0, len(dataset), 17))[:12]
    accuracy, wrong = tool.oracle_accuracy(_IdentityVAE(), dataset, indices, "colour_pitch")
    assert accuracy == 1.0 and not wrong

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    save_file(vae.state_dict(), tmp_path / "step.safetensors")
    result = run_tool_in_process("vae_oracle.py", str(tmp_path / "vae"), str(synthetic_root), "--checkpoints",
                      str(tmp_path / "step.safetensors"), "--preset", "tiny")  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["classes"] == "colour_pitch" and report["windows"] == 12
    assert len(report["video_oracle_accuracy"]) == 2
    assert all(0.0 <= value <= 1.0 for value in report["video_oracle_accuracy"].values())
    foreign = run_tool_in_process("vae_oracle.py", str(tmp_path / "vae"), str(tmp_path), check=False)
    assert foreign.returncode == 2 and "not a synthetic dataset folder" in foreign.stderr
