"""The signal decoder's few-step samplers, guidance on part of the steps, and the steps benchmark
(issue 14 item 2)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tool, preset, run_tool, run_tool_in_process
from test_autoencoder import NUM_CLASSES, seeded, small_config

from mmldm_ae.autoencoder import MultiModalAutoencoder
from mmldm_ae.engine.diffusion import SAMPLERS, build_sampler
from mmldm_ae.pipeline import load_autoencoder
from mmldm_data.config import ConfigError

pytestmark = pytest.mark.usefixtures("plain_single_thread_cpu")
FRAMES = 2


@pytest.fixture(scope="module")
def model() -> MultiModalAutoencoder:
    torch.manual_seed(0)
    return MultiModalAutoencoder(small_config(adversarial=False), NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def latents(model) -> tuple[torch.Tensor, torch.Tensor]:
    cfg, g = model.cfg, seeded(3)
    return (
        torch.randn(2, cfg.latent_channels, cfg.video_latent_size, cfg.video_latent_size, generator=g),
        torch.randn(2, cfg.latent_channels, cfg.audio_latent_size, cfg.audio_latent_size, generator=g),
    )


def decode(model, latents, **settings):
    return model.decode(*latents, num_frames=FRAMES, generator=seeded(1), **settings)


def test_guidance_on_the_first_fraction_of_the_steps(model, latents):
    batches = []
    hook = model.decoder.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    try:
        part = decode(model, latents, steps=4, guidance_fraction=0.5)
    finally:
        hook.remove()
    items = 2 * (1 + FRAMES)
    assert batches == [2 * items, 2 * items, items, items]  # the unconditional branch on 2 of 4 steps
    unguided = decode(model, latents, steps=4, guidance_audio=0.0, guidance_video=0.0)
    never = decode(model, latents, steps=4, guidance_fraction=0.0)
    always = decode(model, latents, steps=4, guidance_fraction=1.0)
    default = decode(model, latents, steps=4)
    for a, b, c, d, p in zip(unguided, never, always, default, part, strict=True):
        assert torch.equal(a, b) and torch.equal(c, d)
        assert not torch.equal(p, a) and not torch.equal(p, c)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_decodes_from_the_config(model, latents, sampler):
    model.cfg.decode_sampler = sampler
    try:
        frames, audio = decode(model, latents, steps=3)
    finally:
        model.cfg.decode_sampler = "ddim"
    assert frames.shape == (2, FRAMES, 4, 16, 16) and audio.shape == (2, 4, 16, 16)
    assert torch.isfinite(frames).all() and torch.isfinite(audio).all()
    assert len(build_sampler(sampler, 3).timesteps) == 3


def test_decoder_sampling_keys_are_validated():
    with pytest.raises(ConfigError, match="ae.decode_sampler"):
        preset("ae", "tiny", decode_sampler="euler")
    with pytest.raises(ConfigError, match="ae.decode_guidance_fraction"):
        preset("ae", "tiny", decode_guidance_fraction=1.5)


@pytest.mark.slow
def test_bench_tool_writes_rows_and_a_recommendation(tiny_ae_run, tmp_path):
    out = tmp_path / "steps.json"
    result = run_tool_in_process(
        "bench_decoder_steps.py",
        str(tiny_ae_run),
        "--num-clips=2",
        "--steps=2",
        "--samplers=dpmsolver++",
        "--guidance-fractions=1.0,0.5",
        "--reference-seeds=1",
        "--reference-steps=2",
        "--vocoder=griffinlim",
        f"--out={out}",
    )
    report = json.loads(out.read_text())
    assert [(r["sampler"], r["steps"], r["guidance_fraction"]) for r in report["rows"]] == [
        ("ddim", 2, 1.0),
        ("dpmsolver++", 2, 1.0),
        ("dpmsolver++", 2, 0.5),
    ]
    assert all(row["rfvd"] >= 0 and row["logmel_l1"] > 0 for row in report["rows"])
    assert report["rows"][2]["unet_evaluations"] == 3
    assert "| dpmsolver++ | 2 | 1 |" in out.with_suffix(".md").read_text()
    assert "Recommended" in result.stdout
    bad = run_tool_in_process("bench_decoder_steps.py", str(tiny_ae_run), "--samplers=euler", check=False)
    assert bad.returncode == 2 and "euler" in bad.stderr


def test_distillation_target_lands_where_the_teacher_two_steps_do():
    tool = load_tool("distill_decoder.py")
    alphas = build_sampler("ddim", 2).alphas_cumprod
    g = seeded(5)
    x_t, x0_first, x0_second = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    a_t, a_mid, a_end = (tool.alpha_bar(alphas, torch.tensor([t] * 3)) for t in (999, 499, -1))
    x_mid = tool.ddim_step(x0_first, x_t, a_t, a_mid)
    x_end = tool.ddim_step(x0_second, x_mid, a_mid, a_end)
    target = tool.one_step_target(x_t, x_end, a_t, a_end)
    torch.testing.assert_close(tool.ddim_step(target, x_t, a_t, a_end), x_end, rtol=1e-4, atol=1e-4)
    assert a_end.flatten()[0] == alphas[0]  # past the last step: abar_0, as diffusers' DDIM


@pytest.mark.slow
def test_distilled_run_loads_and_decodes_in_its_steps(tiny_ae_run, tmp_path):
    out = tmp_path / "distilled"
    run_tool(
        "distill_decoder.py",
        str(tiny_ae_run),
        f"--out={out}",
        "--teacher-steps=4",
        "--student-steps=2",
        "--iterations=2",
        "--batch-size=2",
        "--log-every=1",
    )
    teacher, student = load_autoencoder(tiny_ae_run), load_autoencoder(out)
    cfg = student.model.cfg
    assert (cfg.decode_steps, cfg.decode_sampler, cfg.guidance_audio, cfg.guidance_video) == (
        2,
        "ddim-trailing",
        0.0,
        0.0,
    )
    states = [m.model.state_dict() for m in (teacher, student)]
    changed = {name for name in states[0] if not torch.equal(states[0][name], states[1][name])}
    assert changed and all(name.startswith("decoder.") for name in changed)  # only the UNet trained
    batches = []
    student.model.decoder.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    L = cfg.latent_size
    keys = torch.randn(1, cfg.num_key_frames, cfg.vae_channels, L, L, generator=seeded(2))
    decoded = student.decode_clips(*student.model.encode(keys, keys[:, 0]))
    assert torch.isfinite(decoded.frames).all()
    assert batches == [1 + student.dataset.num_frames] * 2  # one branch, 2 steps
