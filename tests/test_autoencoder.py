"""The hierarchical multi-modal autoencoder (mmldm_ae.autoencoder) at tiny sizes, and the paper
preset's shapes on the meta device."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import preset
from diffusers import AutoencoderKL

from mmldm_ae.autoencoder import AEConfig, MultiModalAutoencoder, build_discriminator
from mmldm_ae.autoencoder import model as autoencoder_model
from mmldm_ae.autoencoder.decoder import DecoderConditions
from mmldm_ae.autoencoder.semantic import contrastive_loss
from mmldm_ae.engine.diffusion import build_sampling_scheduler, build_train_scheduler, predict_x0, q_sample
from mmldm_data.config import ConfigError

NUM_CLASSES = 6


class TinyVAE(torch.nn.Module):
    """A frozen 2-block diffusers AutoencoderKL behind the KLVAE interface (encode/decode/scale)."""

    def __init__(self):
        super().__init__()
        self.model = AutoencoderKL(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
        )
        self.scale, self.downsample, self.latent_channels = 0.18215, 2, 4
        self.requires_grad_(False)

    def encode(self, x, sample=False, generator=None):
        return self.model.encode(x).latent_dist.mode() * self.scale

    def decode(self, z):
        return self.model.decode(z / self.scale).sample


def small_config(**overrides) -> AEConfig:
    """The tiny preset at 32^2 pixels through a 2x VAE (the same 16x16 latents, cheaper pixels), with
    the adversarial term on, as in the paper preset."""
    return preset("ae", "tiny", resolution=32, vae_downsample=2, **({"adversarial": True} | overrides))


def make_batch(cfg: AEConfig, batch_size: int = 2, seed: int = 0, class_id=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    L, C = cfg.latent_size, cfg.vae_channels
    return {
        "key_latents": torch.randn(batch_size, cfg.num_key_frames, C, L, L, generator=g),
        "target_latents": torch.randn(batch_size, 2, C, L, L, generator=g),
        "target_indices": torch.randint(0, 16, (batch_size, 2), generator=g) / 16,
        "audio_latents": torch.randn(batch_size, C, L, L, generator=g),
        "class_id": torch.tensor(class_id if class_id is not None else list(range(batch_size))),
    }


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("plain_single_thread_cpu")


@pytest.fixture(scope="module")
def vae() -> TinyVAE:
    torch.manual_seed(0)
    return TinyVAE()


@pytest.fixture(scope="module")
def model() -> MultiModalAutoencoder:
    """Fresh weights; tests that train must deepcopy it."""
    torch.manual_seed(0)
    return MultiModalAutoencoder(small_config(), NUM_CLASSES)


@pytest.fixture(scope="module")
def discriminator():
    torch.manual_seed(1)
    return build_discriminator(small_config())


# ------------------------------------------------------------------------------- config and presets


def test_paper_preset_is_the_dataclass_defaults():
    assert preset("ae", "paper") == AEConfig()


def test_config_errors_name_the_bad_value():
    with pytest.raises(ConfigError, match="guidance_dropout"):
        preset("ae", "tiny", guidance_dropout=1.0)
    with pytest.raises(
        ConfigError, match=r"ae.guidance_video must be >= 0 \(paper Eq. 9 s; 0: no guidance\)"
    ):
        preset("ae", "tiny", guidance_video=-1.0)
    with pytest.raises(ConfigError, match="projectors must end at the same size"):
        preset("ae", "tiny", audio_projector_mult=[1])
    with pytest.raises(ConfigError, match="vae_downsample"):
        preset("ae", "tiny", resolution=66)
    with pytest.raises(ConfigError, match="w_klx"):
        preset("ae", "tiny", w_klx=1.0)
    with pytest.raises(ConfigError, match="ae/huge"):
        preset("ae", "huge")
    with pytest.raises(ConfigError, match=r"ae.latent_channels \(8\) over ae.num_key_frames \(3\)"):
        preset("ae", "tiny", video_latent="key_frames", num_key_frames=3)
    with pytest.raises(ConfigError, match="ae.video_latent must be one of"):
        preset("ae", "tiny", video_latent="frames")


def test_paper_preset_shapes_on_meta_device():
    cfg = preset("ae", "paper")
    with torch.device("meta"):
        model = MultiModalAutoencoder(cfg, num_classes=9)
        disc = build_discriminator(cfg)
        key = torch.empty(1, 4, 4, 32, 32)
        audio = torch.empty(1, 4, 32, 32)
        z_v, z_a = model.encode(key, audio)
        s_v, s_a = model.semantics(z_v, z_a)
        keep = torch.ones(1, dtype=torch.bool)
        cond = model.decoder_conditions(
            z_v, z_a, s_v, s_a, torch.empty(1, 2), torch.zeros(1, dtype=torch.long), keep, keep
        )
        eps = model.decoder(torch.empty(3, 4, 32, 32), torch.zeros(3, dtype=torch.long), cond)
        logits = disc(torch.empty(2, 3, 3, 256, 256))
    assert z_v.shape == (1, 16, 16, 16) and z_a.shape == (1, 16, 8, 8)
    assert s_v.shape == s_a.shape == (1, 768, 2, 2)
    assert cfg.context_tokens == 82 and cond.context.shape == (3, 82, 768)  # 1 audio item + 2 frames
    assert len(model.decoder.injection_channels) == 12 and len(cond.features) == 12
    assert model.decoder.injection_channels == [320] * 4 + [640] * 3 + [1280] * 5
    assert model.decoder.injection_sizes == [32] * 3 + [16] * 3 + [8] * 3 + [4] * 3
    assert [tuple(f.shape[1:]) for f in cond.features] == [
        (c, s, s)
        for c, s in zip(model.decoder.injection_channels, model.decoder.injection_sizes, strict=True)
    ]
    assert cond.content.shape == (3, 1280)
    assert eps.shape == (3, 4, 32, 32) and logits.shape == (2,)
    assert model.video_content[0].in_features == 4096 and model.audio_content[0].in_features == 1024
    unet = model.decoder.unet.config
    assert list(unet.block_out_channels) == [320, 640, 1280, 1280] and unet.cross_attention_dim == 768
    assert unet.layers_per_block == 2 and unet.attention_head_dim == 8
    n_unet = sum(p.numel() for p in model.decoder.parameters())
    assert 855e6 < n_unet < 865e6  # SD-1.x UNet: 859.5M


# ------------------------------------------------------------------------------------------ shapes


def test_tiny_module_shapes(model):
    cfg = model.cfg
    batch = make_batch(cfg)
    post_v, post_a = model.posteriors(batch["key_latents"], batch["audio_latents"])
    assert post_v.mean.shape == post_v.logvar.shape == (2, 8, 8, 8)
    assert post_a.mean.shape == (2, 8, 4, 4) and post_v.kl().shape == (2,)
    z_v, z_a = model.encode(batch["key_latents"], batch["audio_latents"])
    assert torch.equal(z_v, post_v.mode())
    assert not torch.equal(model.encode(batch["key_latents"], batch["audio_latents"], sample=True)[0], z_v)
    s_v, s_a = model.semantics(z_v, z_a)
    assert s_v.shape == s_a.shape == (2, 64, 2, 2)
    assert model.classifier(s_v, s_a).shape == (2, NUM_CLASSES)
    assert model.predict_class(z_v, z_a).shape == (2,)
    frames = model.frame_index_embed(torch.tensor([0.0, 0.5]))
    assert frames.shape == (2, model.decoder.time_embed_dim)
    cond = model.decoder_conditions(
        z_v, z_a, s_v, s_a, batch["target_indices"], batch["class_id"], *model.guidance_keep_masks(2, "cpu")
    )
    n_items = 2 * (1 + 2)
    assert cond.context.shape == (n_items, cfg.context_tokens, 64) and cfg.context_tokens == 8 + 1 + 4
    assert cond.content.shape == (n_items, model.decoder.time_embed_dim)
    assert model.decoder.injection_channels == [32, 32, 32, 64] and model.decoder.injection_sizes == [
        16,
        16,
        8,
        8,
    ]
    for feature, ch, size in zip(
        cond.features, model.decoder.injection_channels, model.decoder.injection_sizes, strict=True
    ):
        assert feature.shape == (n_items, ch, size, size)
    eps = model.decoder(torch.randn(n_items, 4, 16, 16), torch.arange(n_items), cond)
    assert eps.shape == (n_items, 4, 16, 16)


def test_bad_inputs_are_named(model, vae):
    cfg = model.cfg
    batch = make_batch(cfg)
    with pytest.raises(ValueError, match="key_latents has shape"):
        model.encode(batch["key_latents"][:, :3], batch["audio_latents"])
    with pytest.raises(KeyError, match="class_id"):
        model.training_losses({k: v for k, v in batch.items() if k != "class_id"}, vae, discriminator=None)
    with pytest.raises(ValueError, match="no discriminator"):
        model.training_losses(batch, vae)
    with pytest.raises(RuntimeError, match="class ids must be in"):  # a device-side assertion
        model.training_losses(
            {**batch, "class_id": torch.tensor([0, NUM_CLASSES])}, vae, discriminator=lambda x: x
        )
    with pytest.raises(FileNotFoundError, match="unet_init"):
        MultiModalAutoencoder(small_config(unet_init="/nonexistent/sd"), NUM_CLASSES)


# ------------------------------------------------------- condition paths: no-ops that learn


def _eps_for_latents(model, z_v, z_a, x_t, t, index, class_id):
    s_v, s_a = model.semantics(z_v, z_a)
    keep = torch.ones(z_v.shape[0], dtype=torch.bool)
    cond = model.decoder_conditions(z_v, z_a, s_v, s_a, index, class_id, keep, keep)
    return model.decoder(x_t, t, cond), cond


def test_condition_paths_are_exact_noops_at_init(model):
    """Features, content and cross-modal context all start at exactly zero, whatever the latents."""
    g = seeded(3)
    x_t, t = torch.randn(6, 4, 16, 16, generator=g), torch.randint(0, 1000, (6,), generator=g)
    index, class_id = torch.tensor([[0.0, 0.5], [0.25, 0.75]]), torch.tensor([1, 2])
    with torch.no_grad():
        eps_1, cond = _eps_for_latents(
            model,
            torch.randn(2, 8, 8, 8, generator=g),
            torch.randn(2, 8, 4, 4, generator=g),
            x_t,
            t,
            index,
            class_id,
        )
        eps_2, _ = _eps_for_latents(
            model,
            5 * torch.randn(2, 8, 8, 8, generator=g),
            torch.randn(2, 8, 4, 4, generator=g),
            x_t,
            t,
            index,
            class_id,
        )
        bare = DecoderConditions(
            [torch.zeros_like(f) for f in cond.features], cond.context, torch.zeros_like(cond.content)
        )
        eps_bare = model.decoder(x_t, t, bare)
    assert all(torch.count_nonzero(f) == 0 for f in cond.features)
    assert torch.count_nonzero(cond.content) == 0
    assert torch.count_nonzero(cond.context[:, -4:]) == 0  # the other modality's semantic tokens
    assert torch.equal(eps_1, eps_2) and torch.equal(eps_1, eps_bare)


def test_condition_paths_get_gradients_in_every_layer_after_one_step(model, vae):
    """The authors zeroed whole MLPs, so W1 never learned; here only the last layer starts at zero."""
    model = copy.deepcopy(model)
    model.cfg.guidance_dropout = 0.0
    model.cfg.adversarial = False
    paths = {
        "video_features": model.video_features,
        "audio_features": model.audio_features,
        "frame_index_embed": model.frame_index_embed,
        "video_content": model.video_content,
        "audio_content": model.audio_content,
        "context_from_video": model.context_from_video,
        "context_from_audio": model.context_from_audio,
    }
    batch = make_batch(model.cfg, batch_size=3)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    model.training_losses(batch, vae, generator=seeded(0))["loss"].backward()
    # Step 0: the zero last layers get gradients; layers behind them get none yet.
    for mlp in (model.video_content, model.audio_content, model.context_from_video, model.context_from_audio):
        assert mlp.out.weight.grad.abs().sum() > 0
        assert mlp[0].weight.grad.abs().sum() == 0
    assert model.decoder.unet.time_embedding.linear_1.weight.grad.abs().sum() > 0  # the time MLP trains
    opt.step()
    opt.zero_grad()
    model.training_losses(batch, vae, generator=seeded(1))["loss"].backward()
    for name, module in paths.items():
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (
                f"{name}.{pname} got no gradient after one step"
            )


def test_injection_adds_to_the_encoder_stream_not_only_the_skip(model):
    """A constant injected after conv_in equals raising conv_in's bias: the next layers see it too."""
    decoder = copy.deepcopy(model.decoder)
    g = seeded(4)
    x_t, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
    context = torch.randn(2, 13, 64, generator=g)
    content = torch.randn(2, decoder.time_embed_dim, generator=g)
    features = [
        torch.zeros(2, c, s, s)
        for c, s in zip(decoder.injection_channels, decoder.injection_sizes, strict=True)
    ]
    features[0] = torch.full_like(features[0], 0.3)
    with torch.no_grad():
        injected = decoder(x_t, t, DecoderConditions(features, context, content))
        decoder.unet.conv_in.bias += 0.3
        features[0] = torch.zeros_like(features[0])
        shifted = decoder(x_t, t, DecoderConditions(features, context, content))
    torch.testing.assert_close(injected, shifted, rtol=1e-5, atol=1e-5)


def test_hooks_follow_deepcopies_and_refuse_direct_unet_calls(model):
    ema = copy.deepcopy(model)
    batch = make_batch(model.cfg)
    with torch.no_grad():
        z_v, z_a = ema.encode(batch["key_latents"], batch["audio_latents"])
        eps, _ = _eps_for_latents(
            ema,
            z_v,
            z_a,
            torch.randn(6, 4, 16, 16),
            torch.arange(6),
            batch["target_indices"],
            batch["class_id"],
        )
    assert eps.shape == (6, 4, 16, 16)
    with pytest.raises(RuntimeError, match="outside SignalDecoder.forward"):
        ema.decoder.unet(
            torch.randn(1, 4, 16, 16),
            1,
            encoder_hidden_states=torch.randn(1, 13, 64),
            class_labels=torch.zeros(1, 128),
        )


# --------------------------------------------------------------------------------------- losses


def test_loss_terms_are_finite_and_respond_to_their_weights(model, vae, discriminator):
    batch = make_batch(model.cfg, batch_size=3, class_id=[0, 3, 5])
    base = model.training_losses(batch, vae, discriminator=discriminator, generator=seeded(7))
    scalars = {k: v for k, v in base.items() if v.ndim == 0}
    assert {"loss", "mse_audio", "mse_video", "kl", "cls", "con", "adv_g"} <= scalars.keys()
    assert all(torch.isfinite(v) for v in scalars.values())
    assert all(base[k] > 0 for k in ("mse_audio", "mse_video", "kl", "cls", "con", "adv_g"))
    cfg = model.cfg
    expected = base["mse_audio"] + base["mse_video"] + cfg.w_kl * base["kl"] + cfg.w_cls * base["cls"]
    expected = expected + cfg.w_con * base["con"] + cfg.w_adv * base["adv_g"]
    torch.testing.assert_close(base["loss"], expected)
    assert base["disc_real"].shape == base["disc_fake"].shape == (3, 3, 3, 32, 32)
    assert not base["disc_fake"].requires_grad
    for weight, term in (("w_kl", "kl"), ("w_cls", "cls"), ("w_con", "con"), ("w_adv", "adv_g")):
        varied = copy.copy(model)  # same modules, another config
        varied.cfg = replace(cfg, **{weight: getattr(cfg, weight) + 1.0})
        with torch.no_grad():
            again = varied.training_losses(batch, vae, discriminator=discriminator, generator=seeded(7))
        torch.testing.assert_close(again["loss"] - base["loss"], base[term].detach(), rtol=1e-4, atol=1e-5)


def test_classification_ignores_unlabelled_clips(model, vae):
    cfg = model.cfg
    batch = make_batch(cfg, batch_size=3, class_id=[2, -1, 4])
    model = copy.deepcopy(model)
    model.cfg.adversarial = False
    model.cfg.guidance_dropout = 0.0
    losses = model.training_losses(batch, vae, generator=seeded(2))
    # Recompute the head's logits from the same posterior samples.
    g = seeded(2)
    model.guidance_keep_masks(3, "cpu", g)
    post_v, post_a = model.posteriors(batch["key_latents"], batch["audio_latents"])
    z_v, z_a = post_v.sample(g), post_a.sample(g)
    logits = model.classifier(*model.semantics(z_v, z_a))
    reference = 0.5 * (
        F.cross_entropy(logits[:1], torch.tensor([2])) + F.cross_entropy(logits[2:], torch.tensor([4]))
    )
    torch.testing.assert_close(losses["cls"], reference)

    unlabelled = model.training_losses({**batch, "class_id": torch.full((3,), -1)}, vae, generator=seeded(2))
    assert unlabelled["cls"] == 0
    model.zero_grad()
    unlabelled["cls"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.classifier.parameters())


def test_attention_over_more_sequences_than_a_cuda_grid_holds_goes_in_equal_slices(monkeypatch):
    from mmldm_ae.autoencoder import layers

    layer = layers.Attention(channels=8, head_dim=4, axis="time")
    with torch.no_grad():
        layer.proj.weight.normal_()  # the zero-initialised output would hide the attention
    x = torch.randn(3, 8, 5, 4, 4)  # 3 clips x 16 positions = 48 sequences over time
    whole = layer(x)
    monkeypatch.setattr(layers, "MAX_ATTENTION_BATCH", 7)
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(
        layers.F,
        "scaled_dot_product_attention",
        lambda q, k, v: calls.append(q.shape[0]) or original(q, k, v),
    )
    torch.testing.assert_close(layer(x), whole)
    assert calls == [7] * 6 + [6]


def test_contrastive_loss_matches_a_hand_written_reference():
    g = seeded(5)
    f_v = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    f_a = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    s_v2a, s_a2v = torch.tensor(14.0), torch.tensor(9.0)
    total = 0.0
    for i in range(5):
        v2a = [s_v2a * (f_v[i] @ f_a[j]) for j in range(5)]
        a2v = [s_a2v * (f_a[i] @ f_v[j]) for j in range(5)]
        total += (
            -v2a[i] + torch.logsumexp(torch.stack(v2a), 0) - a2v[i] + torch.logsumexp(torch.stack(a2v), 0)
        )
    torch.testing.assert_close(contrastive_loss(f_v, f_a, s_v2a, s_a2v), total / 10)
    # Matched pairs give a lower loss than shuffled ones.
    assert contrastive_loss(f_v, f_v, s_v2a, s_a2v) < contrastive_loss(f_v, f_v.roll(1, 0), s_v2a, s_a2v)


def test_contrastive_temperature_is_log_parametrised_and_clamped(model):
    head = copy.deepcopy(model.contrastive)
    torch.testing.assert_close(head.scales()[0], torch.tensor(1 / 0.07))
    with torch.no_grad():
        head.log_scale_v2a.fill_(10.0)
        head.log_scale_a2v.fill_(-3.0)
    v2a, a2v = (scale.item() for scale in head.scales())
    assert v2a == pytest.approx(100.0) and a2v == pytest.approx(1.0)


def test_adversarial_term_reaches_the_model_through_the_frozen_vae(model, vae, discriminator):
    losses = model.training_losses(
        make_batch(model.cfg), vae, discriminator=discriminator, generator=seeded(8)
    )
    params = [p for p in model.decoder.parameters()] + list(model.video_features.parameters())
    grads = torch.autograd.grad(losses["adv_g"], params, allow_unused=True)
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    assert all(not p.requires_grad for p in vae.parameters())


def test_guidance_dropout_proportions_and_what_it_zeroes(model, vae):
    keep_a, keep_v = model.guidance_keep_masks(40_000, "cpu", seeded(9))
    assert (~keep_a).float().mean() == pytest.approx(0.1, abs=0.01)
    assert (~keep_v).float().mean() == pytest.approx(0.1, abs=0.01)
    assert (~keep_a & ~keep_v).float().mean() == pytest.approx(0.01, abs=0.003)  # independent

    dropping = copy.deepcopy(model)
    dropping.cfg.guidance_dropout = 0.999
    dropping.cfg.adversarial = False
    seen = {}
    dropping.video_encoder.register_forward_hook(lambda m, i, o: seen.update(video_in=i[0]))
    dropping.audio_encoder.register_forward_hook(lambda m, i, o: seen.update(audio_in=i[0]))
    dropping.decoder.register_forward_hook(lambda m, i, o: seen.update(context=i[2].context))
    losses = dropping.training_losses(make_batch(model.cfg), vae, generator=seeded(10))
    assert losses["guidance_drop_audio"] == 1 and losses["guidance_drop_video"] == 1
    # Both encoders saw all-zero VAE latents, and every item saw a zero prompt.
    assert torch.count_nonzero(seen["video_in"]) == 0 and torch.count_nonzero(seen["audio_in"]) == 0
    assert torch.count_nonzero(seen["context"][:, : model.cfg.prompt_tokens]) == 0


@pytest.mark.parametrize(
    "toggle",
    [
        "learnable_prompt",
        "content_embedding",
        "class_embedding",
        "semantic_context",
        "detach_semantic_inputs",
    ],
)
def test_ablation_toggles_build_and_train(vae, toggle):
    cfg = small_config(adversarial=False, **{toggle: toggle == "detach_semantic_inputs"})
    torch.manual_seed(0)
    model = MultiModalAutoencoder(cfg, NUM_CLASSES)
    seen = {}
    model.decoder.register_forward_hook(lambda m, i, o: seen.update(context=i[2].context))
    losses = model.training_losses(make_batch(cfg), vae, generator=seeded(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and seen["context"].shape[1] == cfg.context_tokens
    encoder_grad = model.video_encoder.conv_in.weight.grad
    if toggle == "detach_semantic_inputs":  # semantic losses alone no longer reach the encoders
        model.zero_grad()
        model.training_losses(make_batch(cfg), vae, generator=seeded(0))["con"].backward()
        assert (
            model.video_encoder.conv_in.weight.grad is None
            or model.video_encoder.conv_in.weight.grad.abs().sum() == 0
        )
    else:
        assert encoder_grad.abs().sum() > 0


def test_key_frame_latent_gives_each_frame_its_key_frames_maps(vae):
    """ae.video_latent=key_frames: z_v holds one map per key frame; a frame at a key frame's index
    reads exactly that map, one between two reads their interpolation; it trains end to end."""
    K = 4
    cfg = small_config(adversarial=False, video_latent="key_frames", num_key_frames=K)
    torch.manual_seed(0)
    model = MultiModalAutoencoder(cfg, NUM_CLASSES).eval()
    batch = make_batch(cfg)
    z_v, _ = model.encode(batch["key_latents"], batch["audio_latents"])
    assert z_v.shape == (2, cfg.latent_channels, cfg.video_latent_size, cfg.video_latent_size)
    maps = z_v.unflatten(1, (K, cfg.frame_latent_channels))
    index = torch.tensor([[0, 4, 6, 15]]).expand(2, 4) / 16
    read = model._frame_latents(z_v, index).unflatten(0, (2, 4))
    torch.testing.assert_close(read[:, 0], maps[:, 0])
    torch.testing.assert_close(read[:, 1], maps[:, 1])
    torch.testing.assert_close(read[:, 2], (maps[:, 1] + maps[:, 2]) / 2)
    torch.testing.assert_close(read[:, 3], maps[:, 3])  # past the last key frame: held
    assert model.video_features.blocks[0].in_layers[0].num_channels == cfg.frame_latent_channels

    losses = model.train().training_losses(batch, vae, generator=seeded(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"]) and model.video_encoder.conv_in.weight.grad.abs().sum() > 0


def test_semantic_losses_reach_the_encoders_by_default(model, vae):
    model = copy.deepcopy(model)
    model.cfg.adversarial = False
    model.training_losses(make_batch(model.cfg), vae, generator=seeded(0))["con"].backward()
    assert model.video_encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.audio_encoder.conv_in.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ weights and decode


def test_unet_initialisation_from_a_local_folder(tmp_path, model):
    source = copy.deepcopy(model.decoder.unet)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.01)
    source.save_pretrained(tmp_path / "sd" / "unet")
    torch.manual_seed(0)
    loaded = MultiModalAutoencoder(small_config(unet_init=str(tmp_path / "sd")), NUM_CLASSES)
    for (name, ours), theirs in zip(
        loaded.decoder.unet.state_dict().items(), source.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    with pytest.raises(ValueError, match="does not match"):
        MultiModalAutoencoder(
            small_config(unet_init=str(tmp_path / "sd"), unet_heads=2, semantic_dim=32), NUM_CLASSES
        )


def test_schedules_are_the_ldm_ones():
    train = build_train_scheduler()
    assert train.config.beta_schedule == "scaled_linear" and train.config.prediction_type == "epsilon"
    assert train.betas[0].item() == pytest.approx(0.00085) and train.betas[-1].item() == pytest.approx(0.012)
    ddim = build_sampling_scheduler(steps=50)
    assert ddim.timesteps[0] == 981 and ddim.timesteps[-1] == 1 and len(ddim.timesteps) == 50
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 400, 999])
    torch.testing.assert_close(
        predict_x0(train, q_sample(train, x0, noise, t), noise, t), x0, rtol=1e-3, atol=1e-3
    )


def test_decode_shapes_and_determinism(model):
    batch = make_batch(model.cfg)
    z_v, z_a = model.encode(batch["key_latents"], batch["audio_latents"])
    frames, audio = model.decode(z_v, z_a, num_frames=3, steps=2, generator=seeded(11))
    assert frames.shape == (2, 3, 4, 16, 16) and audio.shape == (2, 4, 16, 16)
    assert torch.isfinite(frames).all() and torch.isfinite(audio).all()
    again = model.decode(z_v, z_a, num_frames=3, steps=2, generator=seeded(11))
    assert torch.equal(frames, again[0]) and torch.equal(audio, again[1])
    other = model.decode(z_v, z_a, num_frames=3, steps=2, generator=seeded(12))
    assert not torch.equal(frames, other[0])
    unguided = model.decode(
        z_v,
        z_a,
        num_frames=3,
        steps=2,
        guidance_audio=0.0,
        guidance_video=0.0,
        generator=seeded(11),
        class_id=torch.tensor([0, -1]),
    )
    assert unguided[0].shape == frames.shape and not torch.equal(unguided[0], frames)
    assert math.isfinite(unguided[1].abs().sum().item())


def authors_guidance(eps_u, eps_c, w):
    """The authors' form of classifier-free guidance, eps_u + w (eps_c - eps_u), w per item."""
    return eps_u + w.to(eps_c).reshape(-1, 1, 1, 1) * (eps_c - eps_u)


def test_decoder_guidance_is_eq_9_with_the_authors_values_less_one(model, monkeypatch):
    """s here is the authors' w - 1: the default 1.5 decodes as their w = 2.5 and AudioSet's audio
    0.5 / video 2.0 as their 1.5 / 3.0; s = 0, like their w = 1, skips the unconditional branch."""
    batch = make_batch(model.cfg)
    z_v, z_a = model.encode(batch["key_latents"], batch["audio_latents"])
    settings = dict(num_frames=3, steps=2, class_id=torch.tensor([0, 3]))

    def decode(audio, video):
        return model.decode(
            z_v, z_a, guidance_audio=audio, guidance_video=video, generator=seeded(11), **settings
        )

    ours = [decode(None, None), decode(0.5, 2.0)]
    unguided = decode(0.0, 0.0)
    assert model.cfg.guidance_audio == model.cfg.guidance_video == 1.5
    monkeypatch.setattr(autoencoder_model, "guided_eps", authors_guidance)
    theirs = [decode(2.5, 2.5), decode(1.5, 3.0)]
    for mine, reference in zip(ours, theirs, strict=True):
        for x, y in zip(mine, reference, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert not torch.allclose(ours[0][0], unguided[0], atol=1e-3)  # guidance does change the decode
    monkeypatch.setattr(autoencoder_model, "guided_eps", None)  # s = 0 never calls it
    for x, y in zip(decode(0.0, 0.0), unguided, strict=True):
        assert torch.equal(x, y)
