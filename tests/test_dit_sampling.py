"""DiT training masks and loss, guidance, and the samplers (svg, a2v, v2a, continuation, long)."""

from __future__ import annotations

import pytest
import torch
from conftest import preset
from test_dit import as_if_trained, tiny_inputs

from mmldm_ae.engine.diffusion import build_train_scheduler
from mmldm_data.config import ConfigError
from mmldm_dit.dit import MMDiT
from mmldm_dit.sampling import (
    SAMPLERS,
    DiTLossConfig,
    _predict_eps,
    dit_training_loss,
    draw_task_masks,
    sample,
    sample_long,
    task_rates,
)

STEPS = 4  # sampler mechanics do not depend on the step count; keep CPU time small


@pytest.fixture(scope="module")
def tiny_model() -> MMDiT:
    torch.manual_seed(0)
    return as_if_trained(MMDiT(preset("dit", "tiny"))).eval()


@pytest.fixture(scope="module")
def long_model() -> MMDiT:
    torch.manual_seed(0)
    model = as_if_trained(MMDiT(preset("dit", "tiny", previous_clip_depth=2)))
    with torch.no_grad():  # let the previous clip matter, as after training
        for out in model.previous_encoder.outputs:
            out.weight.normal_(0, 0.05)
    return model.eval()


def test_task_masks_have_the_stated_proportions():
    n = 200_000
    cfg = DiTLossConfig()
    masks = draw_task_masks(n, cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    rates = task_rates(cfg)
    assert rates["a2v"] == pytest.approx(0.9 * 0.05 * 0.95)
    for name, p in rates.items():
        observed = getattr(masks, name).float().mean().item()
        assert abs(observed - p) < 5 * (p * (1 - p) / n) ** 0.5, (name, observed, p)
    assert not (masks.a2v & masks.v2a).any()
    assert not ((masks.a2v | masks.v2a) & masks.drop_context).any()
    assert (masks.drop_previous_audio & masks.drop_previous_video)[masks.drop_context].all()
    single = draw_task_masks(
        1000, cfg, torch.device("cpu"), torch.Generator().manual_seed(0), cross_modal=False
    )
    assert not single.a2v.any() and not single.v2a.any()


def test_training_loss_runs_backward_and_is_seeded(tiny_model):
    x_a, x_v, _ = tiny_inputs(batch=8)
    scheduler = build_train_scheduler()
    first = dit_training_loss(tiny_model, x_a, x_v, scheduler, torch.Generator().manual_seed(3))
    again = dit_training_loss(tiny_model, x_a, x_v, scheduler, torch.Generator().manual_seed(3))
    assert set(first) == {"loss", "loss_audio", "loss_video"}
    assert first["loss"].item() == again["loss"].item()
    first["loss"].backward()
    assert tiny_model.final_layers["video"].linear.weight.grad.abs().sum() > 0
    tiny_model.zero_grad()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_follows_the_prediction_type(prediction_type, monkeypatch):
    """A model that always outputs 0 on clean latents of 0: its loss is E[eps^2] = 1 against epsilon,
    and E[abar_t eps^2] (the mean of abar over the drawn t, about 0.3) against
    v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    model = MMDiT(preset("dit", "tiny", schedule={"prediction_type": prediction_type}))
    assert model.cfg.schedule.prediction_type == prediction_type
    zero_forward = lambda z_a, z_v, t, **_: (torch.zeros_like(z_a), torch.zeros_like(z_v))  # noqa: E731
    monkeypatch.setattr(model, "forward", zero_forward)
    zeros = [torch.zeros(256, *model.cfg.latent_shape(m)) for m in ("audio", "video")]
    scheduler = build_train_scheduler(model.cfg.schedule)
    loss = dit_training_loss(model, *zeros, scheduler, torch.Generator().manual_seed(0))["loss_video"].item()
    if prediction_type == "epsilon":
        assert loss == pytest.approx(1.0, abs=0.02)
    else:
        assert 0.2 < loss < 0.45


def test_conditioning_modality_can_be_left_out_of_the_loss(tiny_model):
    x_a, x_v, _ = tiny_inputs(batch=4)
    every_row_a2v = DiTLossConfig(context_drop=0.0, a2v=1.0, v2a=0.0, loss_on_condition=False)
    out = dit_training_loss(tiny_model, x_a, x_v, build_train_scheduler(), cfg=every_row_a2v)
    assert out["loss_audio"].item() == 0.0 and out["loss_video"].item() > 0
    counted = dit_training_loss(
        tiny_model, x_a, x_v, build_train_scheduler(), cfg=DiTLossConfig(a2v=1.0, v2a=0.0, context_drop=0.0)
    )
    assert counted["loss_audio"].item() > 0


def test_long_model_training_needs_the_previous_clip(long_model):
    x_a, x_v, _ = tiny_inputs(batch=4)
    scheduler = build_train_scheduler()
    out = dit_training_loss(long_model, x_a, x_v, scheduler, prev_a=x_a.flip(0), prev_v=x_v.flip(0))
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="prev_a"):
        dit_training_loss(long_model, x_a, x_v, scheduler)


def test_guidance_is_paper_eq_9(tiny_model):
    x_a, x_v, t = tiny_inputs()
    cond_a = torch.randn_like(x_a)
    s_a, s_v = 1.5, 3.0
    with torch.no_grad():
        guided = _predict_eps(
            tiny_model,
            {"audio": x_a, "video": x_v},
            t,
            {"cond_a": cond_a, "cond_v": None},
            {"audio": s_a, "video": s_v},
        )
        conditional = tiny_model(x_a, x_v, t, cond_a=cond_a)
        null = tiny_model(
            x_a, x_v, t, drop_context=torch.ones(2, dtype=torch.bool)
        )  # no prompt, no condition
    for eps, c, u, s in zip(guided.values(), conditional, null, (s_a, s_v), strict=True):
        torch.testing.assert_close(eps, c + s * (c - u), rtol=1e-4, atol=1e-5)


def test_same_seed_same_sample(tiny_model):
    first = sample(tiny_model, "svg", 2, steps=STEPS, seed=7, guidance_audio=2.0, guidance_video=2.0)
    again = sample(tiny_model, "svg", 2, steps=STEPS, seed=7, guidance_audio=2.0, guidance_video=2.0)
    other = sample(tiny_model, "svg", 2, steps=STEPS, seed=8, guidance_audio=2.0, guidance_video=2.0)
    for a, b, c in zip(first, again, other, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("task", ["svg", "a2v", "v2a"])
def test_every_task_samples_at_tiny(tiny_model, task, sampler):
    x_a, x_v, _ = tiny_inputs()
    conditions = {"a2v": {"cond_a": x_a}, "v2a": {"cond_v": x_v}}.get(task, {})
    z_a, z_v = sample(tiny_model, task, 2, steps=STEPS, sampler=sampler, **conditions)
    assert z_a.shape == x_a.shape and z_v.shape == x_v.shape
    assert torch.isfinite(z_a).all() and torch.isfinite(z_v).all()
    if task == "a2v":
        torch.testing.assert_close(z_a, x_a)  # the condition comes back unchanged
    if task == "v2a":
        torch.testing.assert_close(z_v, x_v)


def test_single_modal_model_samples():
    model = as_if_trained(MMDiT(preset("dit", "tiny", modalities=["video"])))
    z_a, z_v = sample(model, "svg", 1, steps=STEPS)
    assert z_a is None and z_v.shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="both modalities"):
        sample(model, "a2v", 1, steps=STEPS, cond_a=torch.zeros(1, 8, 4, 4))


def test_continuation_and_long_generation(long_model):
    x_a, x_v, _ = tiny_inputs()
    plain = sample(long_model, "svg", 2, steps=STEPS)
    continued = sample(long_model, "svg", steps=STEPS, prev_a=x_a)  # audio continuation
    assert not torch.allclose(plain[0], continued[0])
    z_a, z_v = sample_long(long_model, 3, prev_v=x_v, steps=STEPS, guidance_audio=1.0, guidance_video=1.0)
    assert z_a.shape == (2, 3, 8, 4, 4) and z_v.shape == (2, 3, 8, 8, 8)
    with pytest.raises(ValueError, match="long-generation model"):
        sample_long(MMDiT(preset("dit", "tiny")), 2, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "t2v"}, "unknown task"),
        ({"guidance_video": -1.0}, "guidance_video must be >= 0"),
        ({"sampler": "euler"}, "unknown sampler"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_sampling_settings_are_config_errors(tiny_model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        sample(tiny_model, batch_size=1, **kwargs)


def test_conditions_must_match_the_task(tiny_model):
    x_a, x_v, _ = tiny_inputs()
    with pytest.raises(ValueError, match="needs cond_a"):
        sample(tiny_model, "a2v", 2, steps=STEPS)
    with pytest.raises(ValueError, match="cond_v is an input of task v2a"):
        sample(tiny_model, "a2v", cond_a=x_a, cond_v=x_v, steps=STEPS)
