"""The cross-modal discriminator and its hinge losses (mmldm_ae.autoencoder.discriminator)."""

from __future__ import annotations

import pytest
import torch
from conftest import preset
from torch import nn

from mmldm_ae.autoencoder import DiscriminatorConfig
from mmldm_ae.autoencoder.discriminator import (
    FAKE_KINDS,
    CrossModalDiscriminator,
    build_discriminator,
    discriminator_losses,
    discriminator_samples,
)
from mmldm_ae.autoencoder.layers import hinge_loss

SMALL = DiscriminatorConfig(
    channels=8, channel_mult=[1, 2, 2], full_attention_ds=[4], temporal_attention_ds=[2], head_dim=8
)


pytestmark = pytest.mark.usefixtures("plain_single_thread_cpu")


def slots(seed: int, n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class Recorder(nn.Module):
    """A stand-in discriminator: remembers its input, answers a constant logit."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(logit))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.logit.expand(x.shape[0])


def test_shapes_and_attention_layout():
    torch.manual_seed(0)
    disc = CrossModalDiscriminator(SMALL, resolution=16)
    assert disc(slots(0)).shape == (2,)
    axes = [m.axis for m in disc.modules() if hasattr(m, "axis")]
    assert axes == ["time", "spacetime"]  # level ds 2: over slots; ds 4: over slots and space
    with pytest.raises(ValueError, match="expected \\[N, 3, 3, 16, 16\\]"):
        disc(torch.zeros(2, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="not divisible"):
        CrossModalDiscriminator(SMALL, resolution=18)


def test_presets_and_toggle():
    assert build_discriminator(preset("ae", "tiny", adversarial=False)) is None
    tiny = build_discriminator(preset("ae", "tiny", adversarial=True))
    assert tiny(torch.zeros(1, 3, 3, 64, 64)).shape == (1,)
    with torch.device("meta"):
        paper = build_discriminator(preset("ae", "paper"))
    assert 5e6 < sum(p.numel() for p in paper.parameters()) < 6e6
    assert paper.resolution == 256 and len(paper.body) > 0


def test_every_fake_kind_is_built_from_the_right_slots():
    real, fake = slots(1), slots(2)
    samples = discriminator_samples(real, fake)
    assert list(samples) == ["real", *FAKE_KINDS] and len(FAKE_KINDS) == 4
    a, v0, v1 = real.unbind(1)
    a_, v0_, v1_ = fake.unbind(1)
    expected = {
        "real": (a, v0, v1),
        "all_fake": (a_, v0_, v1_),
        "real_frame_b": (a_, v0_, v1),
        "real_frame_a": (a_, v0, v1_),
        "swapped": (a_, v1_, v0_),
    }
    for name, parts in expected.items():
        assert torch.equal(samples[name], torch.stack(parts, dim=1)), name


def test_discriminator_sees_all_kinds_in_one_pass_with_hinge_labels():
    real, fake = slots(3), slots(4)
    disc = Recorder(0.25)
    losses = discriminator_losses(disc, real, fake)
    assert len(disc.inputs) == 1 and disc.inputs[0].shape == (5 * 2, 3, 3, 16, 16)
    shown = disc.inputs[0].chunk(5)
    for seen, (name, sample) in zip(shown, discriminator_samples(real, fake).items(), strict=True):
        assert torch.equal(seen, sample), name
    # Constant logit c: one real sample at relu(1 - c), four fakes at relu(1 + c).
    assert losses["loss_d"].item() == pytest.approx((0.75 + 4 * 1.25) / 5)
    assert set(losses) == {"loss_d", "logit_real", *(f"logit_{k}" for k in FAKE_KINDS)}
    losses["loss_d"].backward()
    assert disc.logit.grad.item() == pytest.approx((-1 + 4 * 1) / 5)  # pushes fakes down more than reals up


def test_discriminator_step_does_not_touch_the_generator_graph():
    fake = slots(5).requires_grad_(True)
    disc = Recorder(0.0)
    discriminator_losses(disc, slots(6), fake)["loss_d"].backward()
    assert fake.grad is None


def test_generator_hinge_wants_fakes_called_real():
    logits = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    loss = hinge_loss(logits, 1.0)
    assert loss.item() == pytest.approx((3.0 + 0.5 + 0.0) / 3)
    loss.backward()
    assert (logits.grad <= 0).all() and logits.grad[2] == 0


def test_discriminator_learns_to_separate_reals_from_fakes():
    torch.manual_seed(0)
    disc = CrossModalDiscriminator(SMALL, resolution=16)
    opt = torch.optim.AdamW(disc.parameters(), lr=2e-3)
    real, fake = slots(7, n=4) * 0.2, slots(8, n=4)
    first = None
    for _ in range(8):
        loss = discriminator_losses(disc, real, fake)["loss_d"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
