"""Table 5's "latent average pooling": the content embedding pools the own perceptual latent by
flattening it (the authors' code, `ae.content_pooling=flatten`, the default) or by a spatial average
(the paper's text, `ae.content_pooling=avg`)."""

from __future__ import annotations

import pytest
import torch
from conftest import preset

from mmldm_ae.autoencoder import MultiModalAutoencoder
from mmldm_ae.autoencoder.semantic import pool_content
from mmldm_data.config import ConfigError

pytestmark = pytest.mark.usefixtures("plain_single_thread_cpu")
B, T = 2, 3  # clips, frames per clip


def content_of(model: MultiModalAutoencoder, z_v: torch.Tensor, z_a: torch.Tensor) -> torch.Tensor:
    """The content embeddings [B + B*T, E] the decoder adds to its time embedding."""
    keep = torch.ones(B, dtype=torch.bool)
    index = torch.arange(T).expand(B, T) / T
    conditions = model.decoder_conditions(
        z_v, z_a, *model.semantics(z_v, z_a), index, torch.zeros(B, dtype=torch.long), keep, keep
    )
    return conditions.content


@pytest.fixture(scope="module", params=["flatten", "avg"])
def model(request) -> MultiModalAutoencoder:
    cfg = preset("ae", "tiny", resolution=32, vae_downsample=2, content_pooling=request.param)
    torch.manual_seed(0)
    model = MultiModalAutoencoder(cfg, num_classes=6).eval()
    with torch.no_grad():  # the last layers start at zero (a no-op condition); give them weights
        for mlp in (model.video_content, model.audio_content):
            torch.nn.init.normal_(mlp.out.weight, std=0.1)
    return model


def test_each_pooling_builds_and_embeds_to_the_time_embedding(model):
    cfg = model.cfg
    C, lv, la = cfg.latent_channels, cfg.video_latent_size, cfg.audio_latent_size
    flat = cfg.content_pooling == "flatten"
    assert model.video_content[0].in_features == (C * lv * lv if flat else C)
    assert model.audio_content[0].in_features == (C * la * la if flat else C)
    z_v, z_a = torch.randn(B, C, lv, lv), torch.randn(B, C, la, la)
    with torch.no_grad():
        content = content_of(model, z_v, z_a)
    assert content.shape == (B + B * T, model.decoder.time_embed_dim)
    assert content.abs().sum() > 0


def test_average_pooling_sees_what_is_in_the_latent_not_where(model):
    """Moving the latent's positions around (the same for every channel) changes nothing with avg,
    and changes the embedding with the authors' flatten."""
    cfg = model.cfg
    C, lv, la = cfg.latent_channels, cfg.video_latent_size, cfg.audio_latent_size
    z_v, z_a = torch.randn(B, C, lv, lv), torch.randn(B, C, la, la)

    def moved(z: torch.Tensor) -> torch.Tensor:
        side = z.shape[-1]
        order = torch.randperm(side * side, generator=torch.Generator().manual_seed(1))
        return z.flatten(2)[:, :, order].reshape_as(z)

    with torch.no_grad():
        same = torch.allclose(
            content_of(model, z_v, z_a), content_of(model, moved(z_v), moved(z_a)), atol=1e-5
        )
    assert same == (cfg.content_pooling == "avg")


def test_average_pooling_is_the_spatial_mean():
    z = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pool_content(z, "avg"), z.mean(dim=(2, 3)))
    torch.testing.assert_close(pool_content(z, "flatten"), z.reshape(2, 48))


def test_an_unknown_pooling_names_the_key():
    with pytest.raises(ConfigError, match="ae.content_pooling must be one of"):
        preset("ae", "tiny", content_pooling="max")
