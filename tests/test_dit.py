"""The MM-LDM DiT: token layout, positions, zero-initialised conditions, adaLN-Zero, presets, configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, preset, run_tool_in_process
from einops import rearrange

from mmldm_data.config import ConfigError, to_typed
from mmldm_dit.dit import DiTConfig, MMDiT, sincos_position_embedding

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
    assert model.token_slices() == {
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
    slices = model.token_slices()
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
