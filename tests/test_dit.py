"""The MM-LDM DiT: token layout, positions, zero-initialised conditions, adaLN-Zero, presets, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, preset, run_tool_in_process
from einops import rearrange

from mmldm_data.config import ConfigError, to_typed
from mmldm_dit.dit import DiTConfig, MMDiT, cross_modal_time_bias, sincos_position_embedding

PAPER_PARAMS = {"S": 131e6, "B": 384e6, "L": 1543e6}  # paper Table 4
SIZES = sorted(path.stem for path in (REPO_ROOT / "conf" / "dit").glob("*.yaml"))


def as_if_trained(model: MMDiT, seed: int = 0) -> MMDiT:
    """Give the zero-initialised adaLN and final layers random weights, so outputs depend on inputs;
    condition embeddings and previous-clip outputs keep their zero initialisation."""
    generator = torch.Generator().manual_seed(seed)
    layers = [block.adaLN_modulation[-1] for block in model._all_blocks()]
    for final_layer in model.final_layers.values():
        layers += [final_layer.adaLN_modulation[-1], final_layer.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.05)
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.05)
    return model


def tiny_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_a = torch.randn(batch, 8, 4, 4, generator=generator)
    x_v = torch.randn(batch, 8, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    return x_a, x_v, t


def dit_numpy_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """DiT's reference implementation (facebookresearch/DiT models.py)."""

    def from_grid_1d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = from_grid_1d(embed_dim // 2, grid[0])
    emb_w = from_grid_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def test_paper_token_layout_is_context_eos_audio_eos_video():
    with torch.device("meta"):
        model = MMDiT(preset("dit", "XL"))
    assert model.cfg.sequence_length == 399
    assert model.cfg.token_slices() == {
        "context": slice(0, 77),
        "eos_audio": slice(77, 78),
        "audio": slice(78, 142),
        "eos_video": slice(142, 143),
        "video": slice(143, 399),
    }


def test_tokens_are_placed_in_order_with_their_embeddings():
    model = MMDiT(preset("dit", "tiny"))
    x_a, x_v, _ = tiny_inputs()
    tokens = model.tokens({"audio": x_a, "video": x_v}, {"audio": x_a, "video": x_v}, None)
    slices = model.cfg.token_slices()
    assert tokens.shape == (2, 90, 96)
    assert [s.stop - s.start for s in slices.values()] == [8, 1, 16, 1, 64]
    embedders = model.tokens.modalities
    for name, x in (("audio", x_a), ("video", x_v)):
        embedder = embedders[name]
        torch.testing.assert_close(tokens[:, slices[f"eos_{name}"]], embedder.eos.expand(2, -1, -1))
        expected = embedder.patch_embed(x) + embedder.pos_embed + embedder.modality_embed
        torch.testing.assert_close(tokens[:, slices[name]], expected)
    torch.testing.assert_close(tokens[:, slices["context"]], model.tokens.context(2, None))


@pytest.mark.parametrize("grid", [4, 8, 16])
def test_sincos_positions_equal_dit_numpy_reference(grid):
    ours = sincos_position_embedding(96, grid).numpy()
    np.testing.assert_allclose(ours, dit_numpy_sincos(96, grid), atol=1e-5)
    model = MMDiT(preset("dit", "tiny"))
    np.testing.assert_allclose(
        model.tokens.modalities["video"].pos_embed[0].numpy(), dit_numpy_sincos(96, 8), atol=1e-5
    )


def test_patchified_output_round_trips_the_latent_grid():
    model = MMDiT(preset("dit", "tiny", patch_size=2))
    x_a, x_v, t = tiny_inputs()
    assert model.cfg.sequence_length == 8 + 1 + 4 + 1 + 16
    eps_a, eps_v = as_if_trained(model)(x_a, x_v, t)
    assert eps_a.shape == x_a.shape and eps_v.shape == x_v.shape
    patches = rearrange(x_v, "b c (h p) (w q) -> b (h w) (p q c)", p=2, q=2)
    torch.testing.assert_close(model.unpatchify(patches, "video"), x_v)


# The synthetic benchmark's layout (conf/synth_bench.yaml): z_v of 8 key frames x 2 channels, one token
# per key frame, z_a 16 x 4 x 4 at patch 1.
KEY_FRAMES = dict(audio_latent_channels=16, video_latent_channels=16, video_key_frames=8, video_patch_size=8)


@pytest.mark.parametrize("video_patch_size", [8, 2])
def test_key_frame_tokens_are_frame_after_frame_and_round_trip(video_patch_size):
    cfg = preset("dit", "tiny", **{**KEY_FRAMES, "video_patch_size": video_patch_size})
    model = MMDiT(cfg)
    side = 8 // video_patch_size
    assert cfg.num_tokens("video") == 8 * side**2
    assert cfg.sequence_length == 8 + 1 + 16 + 1 + 8 * side**2
    x_v = torch.randn(2, 16, 8, 8)
    embedder = model.tokens.modalities["video"]
    tokens = embedder.patches(embedder.patch_embed, x_v, 1)
    for frame in (0, 5):  # key frame k: channels 2k, 2k + 1, tokens k N ... (k + 1) N - 1
        torch.testing.assert_close(
            tokens[:, frame * side**2 : (frame + 1) * side**2],
            embedder.patch_embed(x_v[:, 2 * frame : 2 * frame + 2]),
        )
    patches = rearrange(
        x_v, "b (k c) (h p) (w q) -> b (k h w) (p q c)", k=8, p=video_patch_size, q=video_patch_size
    )
    torch.testing.assert_close(model.unpatchify(patches, "video"), x_v)
    x_a = torch.randn(2, 16, 4, 4)
    t = torch.tensor([10, 900])
    eps_a, eps_v = as_if_trained(model)(x_a, x_v, t, cond_a=x_a)
    assert eps_a.shape == x_a.shape and eps_v.shape == x_v.shape


def test_previous_clip_tokens_pair_each_key_frame_with_its_previous_one():
    model = as_if_trained(MMDiT(preset("dit", "tiny", **KEY_FRAMES, previous_clip_depth=2)))
    previous, current = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8)
    embedder = model.previous_encoder.tokens.modalities["video"]
    tokens = embedder.patches(embedder.patch_embed, torch.cat([previous, current], dim=1), 2)
    frame_4 = torch.cat([previous[:, 8:10], current[:, 8:10]], dim=1)
    torch.testing.assert_close(tokens[:, 4:5], embedder.patch_embed(frame_4))
    eps_a, eps_v = model(torch.randn(2, 16, 4, 4), current, torch.tensor([5, 500]), prev_v=previous)
    assert eps_v.shape == current.shape


def test_audio_and_video_tokens_share_one_time_axis():
    cfg = preset("dit", "tiny", **KEY_FRAMES)
    model = MMDiT(cfg)
    embedders = model.tokens.modalities
    # Audio grid column j covers key frames 2j .. 2j + 2 of the clip: its centre is 2j + 1.
    audio_times = embedders["audio"].token_times(cfg, "audio", 4)
    assert audio_times.view(4, 4).tolist() == [[1.0, 3.0, 5.0, 7.0]] * 4
    assert embedders["video"].token_times(cfg, "video", 1).tolist() == [float(k) for k in range(8)]
    # The same time gets the same time embedding in both modalities: the audio token of column 1 (time
    # 3) and video key frame 3 differ only by their grid positions' sin-cos.
    audio_time = embedders["audio"].pos_embed[0, 1] - sincos_position_embedding(96, 4)[1]
    video_time = embedders["video"].pos_embed[0, 3] - sincos_position_embedding(96, 1)[0]
    torch.testing.assert_close(audio_time, video_time)


def test_time_bias_joins_audio_and_video_tokens_by_their_time_apart():
    cfg = preset("dit", "tiny", **KEY_FRAMES)
    bias = cross_modal_time_bias(cfg)[0]  # [H, L, L]
    slices = cfg.token_slices()
    audio, video = slices["audio"], slices["video"]
    assert bias.shape == (4, 34, 34)
    torch.testing.assert_close(bias, bias.transpose(1, 2))
    assert bias[0].abs().max() == 0  # one global head
    # Within a modality and to the context / EOS tokens: no bias.
    assert bias[:, audio, audio].abs().max() == 0 and bias[:, video, video].abs().max() == 0
    assert bias[:, : audio.start].abs().max() == 0
    # Audio column 1 (time 3) to key frames 3, 2 and 0: 0, then ever more negative, more so in later heads.
    column_1 = audio.start + 1
    row = bias[:, column_1, video]
    assert (row[:, 3] == 0).all() and (row[1:, 2] < 0).all() and (row[1:, 0] < row[1:, 2]).all()
    assert (row[2, :] <= row[1, :]).all() and (row[3, :] <= row[2, :]).all()
    assert cross_modal_time_bias(preset("dit", "tiny")) is None  # the paper's layout: none


def test_adaln_zero_blocks_are_identity_and_output_is_zero_at_init():
    model = MMDiT(preset("dit", "tiny"))
    x = torch.randn(2, 90, 96)
    c = torch.randn(2, 96)
    for block in model.blocks:
        torch.testing.assert_close(block(x, c), x)
    x_a, x_v, t = tiny_inputs()
    eps_a, eps_v = model(x_a, x_v, t)
    assert eps_a.abs().max() == 0 and eps_v.abs().max() == 0


def test_conditions_have_no_effect_at_init_but_get_gradients():
    model = as_if_trained(MMDiT(preset("dit", "tiny")))
    x_a, x_v, t = tiny_inputs()
    plain = model(x_a, x_v, t)
    conditioned = model(x_a, x_v, t, cond_a=torch.randn_like(x_a), cond_v=torch.randn_like(x_v))
    for a, b in zip(plain, conditioned, strict=True):
        torch.testing.assert_close(a, b)
    (conditioned[0].square().mean() + conditioned[1].square().mean()).backward()
    for name in ("audio", "video"):
        grad = model.tokens.modalities[name].condition_embed.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_previous_clip_has_no_effect_at_init_but_gets_gradients():
    model = as_if_trained(MMDiT(preset("dit", "tiny", previous_clip_depth=2)))
    x_a, x_v, t = tiny_inputs()
    plain = model(x_a, x_v, t)
    continued = model(x_a, x_v, t, prev_a=torch.randn_like(x_a), prev_v=torch.randn_like(x_v))
    for a, b in zip(plain, continued, strict=True):
        torch.testing.assert_close(a, b)
    (continued[0].square().mean() + continued[1].square().mean()).backward()
    for out in model.previous_encoder.outputs:
        assert out.weight.grad is not None and out.weight.grad.abs().sum() > 0


def test_dropping_the_context_changes_only_dropped_rows():
    model = as_if_trained(MMDiT(preset("dit", "tiny")))
    x_a, x_v, t = tiny_inputs()
    kept = model(x_a, x_v, t)
    dropped = model(x_a, x_v, t, drop_context=torch.tensor([False, True]))
    torch.testing.assert_close(dropped[1][0], kept[1][0])
    assert not torch.allclose(dropped[1][1], kept[1][1])


@pytest.mark.parametrize("modalities", [["video"], ["audio"]])
def test_single_modal_variants(modalities):
    model = as_if_trained(MMDiT(preset("dit", "tiny", modalities=modalities)))
    x_a, x_v, t = tiny_inputs()
    only = modalities[0]
    eps_a, eps_v = model(x_a if only == "audio" else None, x_v if only == "video" else None, t)
    assert (eps_a is None) == (only == "video") and (eps_v is None) == (only == "audio")
    assert model.cfg.sequence_length == 8 + 1 + model.cfg.num_tokens(only)
    assert all(m.condition_embed is None for m in model.tokens.modalities.values())
    other = "v" if only == "audio" else "a"
    with pytest.raises(ValueError, match=f"x_{other} was given"):
        model(x_a, x_v, t)
    with pytest.raises(ValueError, match="both modalities"):
        model(x_a if only == "audio" else None, x_v if only == "video" else None, t, cond_a=x_a)


def test_bad_inputs_name_the_argument():
    model = MMDiT(preset("dit", "tiny"))
    x_a, x_v, t = tiny_inputs()
    with pytest.raises(ValueError, match="x_v has shape"):
        model(x_a, x_v[:, :4], t)
    with pytest.raises(ValueError, match="x_a is required"):
        model(None, x_v, t)
    with pytest.raises(ValueError, match="previous_clip_depth"):
        model(x_a, x_v, t, prev_a=x_a)


@pytest.mark.parametrize("name", ["S", "B", "L"])
def test_preset_parameter_counts_match_paper_table_4(name):
    with torch.device("meta"):
        model = MMDiT(preset("dit", name))
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / PAPER_PARAMS[name] - 1) < 0.03, params


def test_authors_xl_is_the_dataclass_defaults():
    assert preset("dit", "XL") == DiTConfig()


@pytest.mark.parametrize("name", SIZES)
def test_every_size_takes_the_latents_of_its_autoencoder(name):
    dit, ae = preset("dit", name), preset("ae", "tiny" if name.startswith("tiny") else "paper")
    assert dit.latent_shape("audio") == (ae.latent_channels, ae.audio_latent_size, ae.audio_latent_size)
    assert dit.latent_shape("video") == (ae.latent_channels, ae.video_latent_size, ae.video_latent_size)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"patch_size": 3}, "dit.patch_size"),
        ({"video_patch_size": 3}, "dit.video_patch_size"),
        ({"video_key_frames": 3}, "dit.video_key_frames"),
        ({"num_heads": 5}, "dit.num_heads"),
        ({"modalities": ["sound"]}, "dit.modalities"),
        ({"previous_clip_depth": 9}, "dit.previous_clip_depth"),
        ({"audio_latent_size": 0}, "dit.audio_latent_size"),
        ({"context_tokens": 0}, "dit.context_tokens"),
    ],
)
def test_bad_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        preset("dit", "tiny", **overrides)


def test_misspelt_config_key_is_named():
    with pytest.raises(ConfigError, match="hiden_size"):
        to_typed(DiTConfig, {"hiden_size": 96})
    with pytest.raises(ConfigError, match="dit/XXL"):
        preset("dit", "XXL")


@pytest.mark.slow
def test_model_card_last_line_is_json_of_all_presets():
    result = run_tool_in_process("model_card.py")
    cards = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(cards) == set(SIZES)
    for name, card in cards.items():
        assert card["params"] > 0 and card["gflops"] > 0, name
    assert abs(cards["S"]["gmacs_linear"] - 34) < 1  # the paper's Table 4 FLOPS convention
