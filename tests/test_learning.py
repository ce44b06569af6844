"""The models learn (issue 13, item 8): short CPU trainings of tiny models beat chance by a stated margin,
and fall to chance when the path that carries the information is cut, so a pass means that path works.

* DiT: trained on a handful of class-structured latents (K classes, each a random prototype pair
  (z_a, z_v) plus noise), its a2v / v2a samples for fresh draws of a class lie nearest that class's
  training latents of the generated modality. Cut: the given latent never reaches the model, neither
  through the zero-initialised condition embedding nor on the noised trajectory the sampler keeps the
  given modality on.
* DiT timing: on latents whose class and one event time are shared by the pair (the event a pattern in
  one column of z_a, the mel's time axis, and in the two key frames of z_v at that time), the tiny DiT
  with key-frame tokens (conf/synth_bench.yaml's layout) puts a2v / v2a events where the given latent
  has its own. Cut: trained without the cross-modal time bias, in the same steps it places them
  worse by a stated margin (on the synthetic benchmark's latents it learnt no timing at all).
* Autoencoder: its classification head (`predict_class`) reads the class of held-out synthetic clips
  (other seeds than training's) after a short training through the model's own loss. Cut: the clip's
  latents never reach the semantic projectors.

Both run at one torch thread with fixed seeds, so their figures are exact on one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import preset
from einops import rearrange
from torch import Tensor

import mmldm_dit.sampling as sampling
from mmldm_ae.autoencoder import MultiModalAutoencoder
from mmldm_ae.autoencoder.encoders import DiagonalGaussian
from mmldm_ae.engine.diffusion import build_train_scheduler, q_sample
from mmldm_ae.pipeline import pixels_to_latents
from mmldm_ae.vae import KLVAE, VAEConfig, build_vae
from mmldm_data.audio import MelConfig, waveform_to_audio_image
from mmldm_data.config import DatasetConfig
from mmldm_data.synthetic import SyntheticConfig, render_clip
from mmldm_data.video import to_model_frames
from mmldm_dit.dit import MMDiT
from mmldm_dit.sampling import DiTLossConfig, dit_training_loss, sample

NUM_CLASSES = 6  # as the synthetic set
CHANCE = 1 / NUM_CLASSES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as under `make test`: the figures below are exact for it (reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#################################################################################
#                  DiT: a2v / v2a on class-structured latents                   #
#################################################################################

DIT_STEPS = 500  # full-batch AdamW steps at lr 1e-3: ~11 s at one thread
LATENT_NOISE = 0.5  # within-class spread of a latent around its class prototype (prototypes: N(0, 1))
SAMPLE_STEPS = 20  # DDIM
GUIDANCE = 3.0  # paper Eq. 9 s of the generated modality, as conf/demo.yaml
DIT_MARGIN = 0.4  # trained: accuracy >= chance + this, 7 binomial sd of chance at 48 samples per task
CUT_TOLERANCE = 0.15  # cut: accuracy <= chance + this


@dataclass
class ClassLatents:
    """Standardised latent pairs (unit variance, as the DiT sees a cache through LatentStats)."""

    z_a: Tensor  # [N, Ca, Sa, Sa]
    z_v: Tensor  # [N, Cv, Sv, Sv]
    class_id: Tensor  # [N]


def class_latents(prototypes: tuple[Tensor, Tensor], per_class: int, seed: int) -> ClassLatents:
    """per_class noisy draws around each class's prototype pair [K, C, S, S] (audio, video)."""
    generator = torch.Generator().manual_seed(seed)
    class_id = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    z_a, z_v = (
        (p[class_id] + LATENT_NOISE * torch.randn(p[class_id].shape, generator=generator))
        / (1 + LATENT_NOISE**2) ** 0.5
        for p in prototypes
    )
    return ClassLatents(z_a, z_v, class_id)


@dataclass
class TrainedDiT:
    model: MMDiT
    train: ClassLatents  # the "cache" it trained on: 4 pairs per class
    given: ClassLatents  # conditions it never saw: 8 fresh draws per class


@pytest.fixture(scope="module")
def trained_dit() -> TrainedDiT:
    # The tiny preset (v prediction, its latent shapes) at a quarter of its width x depth, patches of 2.
    cfg = preset("dit", "tiny", patch_size=2, hidden_size=64, depth=2, context_tokens=1, context_dim=16)
    generator = torch.Generator().manual_seed(0)
    prototypes = tuple(
        torch.randn(NUM_CLASSES, *cfg.latent_shape(m), generator=generator) for m in ("audio", "video")
    )
    train = class_latents(prototypes, per_class=4, seed=1)
    torch.manual_seed(0)
    model = MMDiT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = build_train_scheduler(cfg.schedule)
    for _ in range(DIT_STEPS):  # the default task mix: 10% unconditional, ~4% a2v, ~4% v2a
        loss = dit_training_loss(model, train.z_a, train.z_v, scheduler, generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return TrainedDiT(model.eval(), train, class_latents(prototypes, per_class=8, seed=2))


def nearest_class(generated: Tensor, reference: Tensor, reference_class: Tensor) -> Tensor:
    """[N, C, S, S] -> [N]: the class of each sample's nearest reference latent (Euclidean)."""
    return reference_class[torch.cdist(generated.flatten(1), reference.flatten(1)).argmin(dim=1)]


def cross_modal_accuracy(trained: TrainedDiT) -> dict[str, float]:
    """Fractions of a2v / v2a samples whose nearest training latent has the given clip's class."""
    model, train, given = trained.model, trained.train, trained.given
    _, z_v = sample(model, "a2v", cond_a=given.z_a, guidance_video=GUIDANCE, steps=SAMPLE_STEPS)
    z_a, _ = sample(model, "v2a", cond_v=given.z_v, guidance_audio=GUIDANCE, steps=SAMPLE_STEPS)
    hits = {
        "a2v": nearest_class(z_v, train.z_v, train.class_id) == given.class_id,
        "v2a": nearest_class(z_a, train.z_a, train.class_id) == given.class_id,
    }
    return {task: round(h.float().mean().item(), 3) for task, h in hits.items()}


def test_dit_generates_the_given_class_after_a_short_training(trained_dit):
    accuracy = cross_modal_accuracy(trained_dit)  # 48 samples per task
    assert min(accuracy.values()) >= CHANCE + DIT_MARGIN, (accuracy, f"chance {CHANCE:.3f}")


def test_dit_is_at_chance_when_the_given_latent_cannot_reach_it(trained_dit, monkeypatch):
    # The two ways the given latent reaches the model, both replaced by the null (zero) latent that
    # training's unconditioned rows see: the condition embedding's input, and the trajectory
    # q_sample(z_given, t) the sampler keeps the given modality on.
    model = trained_dit.model
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *args, cond_a=None, cond_v=None, **kw: forward(*args, **kw))
    monkeypatch.setattr(
        sampling,
        "q_sample",
        lambda scheduler, z, noise, t: q_sample(scheduler, torch.zeros_like(z), noise, t),
    )
    accuracy = cross_modal_accuracy(trained_dit)
    assert max(accuracy.values()) <= CHANCE + CUT_TOLERANCE, (accuracy, f"chance {CHANCE:.3f}")


#################################################################################
#           DiT timing: a2v / v2a put the event at the given latent's time         #
#################################################################################

EVENT_COLUMNS = 4  # z_a's time columns; event in column e <-> key frames 2e, 2e + 1 of z_v
EVENT_STEPS = 300  # full-batch AdamW steps at lr 1e-3, a2v / v2a on 30% of the rows each: ~16 s
EVENT_CHANCE = 1 / EVENT_COLUMNS
EVENT_MARGIN = 0.5  # with the time bias: event accuracy >= chance + this (48 samples per task)
BIAS_MARGIN = 0.25  # without it: a2v / v2a accuracy lower, on the task it helps most, by at least this


@dataclass
class EventLatents:
    z_a: Tensor  # [N, 16, 4, 4]
    z_v: Tensor  # [N, 16, 8, 8]: 8 key frames x 2 channels
    event: Tensor  # [N] column of the event


class EventWorld:
    """Class prototypes plus one event pattern per modality, placed at a random time per pair."""

    def __init__(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.prototypes = (
            torch.randn(NUM_CLASSES, 16, 4, 4, generator=generator),
            torch.randn(NUM_CLASSES, 16, 8, 8, generator=generator),
        )
        self.audio_event = 2 * torch.randn(16, 4, generator=generator)  # one column: channels x rows
        self.video_event = 2 * torch.randn(4, 8, 8, generator=generator)  # two key frames of 2 channels

    def draw(self, per_class: int, seed: int) -> EventLatents:
        generator = torch.Generator().manual_seed(seed)
        class_id = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
        event = torch.randint(EVENT_COLUMNS, class_id.shape, generator=generator)
        z_a, z_v = (
            p[class_id] + LATENT_NOISE * torch.randn(p[class_id].shape, generator=generator)
            for p in self.prototypes
        )
        for row, column in enumerate(event.tolist()):
            z_a[row, :, :, column] += self.audio_event
            z_v[row, 4 * column : 4 * column + 4] += self.video_event
        return EventLatents(z_a, z_v, event)

    def read(self, z_a: Tensor | None = None, z_v: Tensor | None = None) -> Tensor:
        """The event column of each latent: where its event pattern correlates most."""
        if z_a is not None:
            return torch.einsum("bchw,ch->bw", z_a, self.audio_event).argmax(1)
        frames = rearrange(z_v, "b (e c) h w -> b e c h w", e=EVENT_COLUMNS)
        return torch.einsum("bechw,chw->be", frames, self.video_event).argmax(1)


def event_accuracy(time_bias: bool) -> dict[str, float]:
    """Train the tiny DiT with key-frame tokens (with or without its time bias); a2v / v2a event accuracy
    on fresh pairs."""
    world = EventWorld()
    train, given = world.draw(per_class=8, seed=1), world.draw(per_class=8, seed=2)
    scale = {"audio": train.z_a.std(), "video": train.z_v.std()}  # unit variance, as LatentStats
    cfg = preset(
        "dit",
        "tiny",
        audio_latent_channels=16,
        video_latent_channels=16,
        video_key_frames=8,
        video_patch_size=8,
        hidden_size=64,
        depth=2,
        context_tokens=1,
        context_dim=16,
    )
    torch.manual_seed(0)
    model = MMDiT(cfg)
    if not time_bias:
        model.time_bias = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = build_train_scheduler(cfg.schedule)
    generator = torch.Generator().manual_seed(0)
    tasks = DiTLossConfig(a2v=0.3, v2a=0.3)
    for _ in range(EVENT_STEPS):
        z_a, z_v = train.z_a / scale["audio"], train.z_v / scale["video"]
        loss = dit_training_loss(model, z_a, z_v, scheduler, generator, tasks)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    common = dict(guidance_audio=GUIDANCE, guidance_video=GUIDANCE, steps=SAMPLE_STEPS)
    _, z_v = sample(model, "a2v", cond_a=given.z_a / scale["audio"], **common)
    z_a, _ = sample(model, "v2a", cond_v=given.z_v / scale["video"], **common)
    hits = {"a2v": world.read(z_v=z_v) == given.event, "v2a": world.read(z_a=z_a) == given.event}
    return {task: round(h.float().mean().item(), 3) for task, h in hits.items()}


@pytest.fixture(scope="module")
def event_accuracies() -> dict[bool, dict[str, float]]:
    return {bias: event_accuracy(bias) for bias in (True, False)}


def test_dit_places_the_given_event_in_time_after_a_short_training(event_accuracies):
    accuracy = event_accuracies[True]
    assert min(accuracy.values()) >= EVENT_CHANCE + EVENT_MARGIN, (accuracy, f"chance {EVENT_CHANCE}")


def test_dit_places_events_worse_without_the_time_bias(event_accuracies):
    gaps = {task: event_accuracies[True][task] - event_accuracies[False][task] for task in ("a2v", "v2a")}
    assert max(gaps.values()) >= BIAS_MARGIN, event_accuracies


#################################################################################
#                 Autoencoder: the class head on held-out clips                 #
#################################################################################

AE_BATCH = 12  # clips per step (8: slower to learn, no faster)
AE_STEPS = 250  # AdamW steps at the tiny preset's lr 1e-3: 20-30 s at one thread
AE_MARGIN = 1 / 3  # held-out accuracy >= chance + this (24 clips: 4 of each class)
DATA = DatasetConfig(resolution=32, mel=MelConfig(image_size=32))  # windows as conftest's tiny runs
TARGET_FRAMES = [3, 12]  # the decoder's targets: unused here (its pass is skipped), the batch needs them


def clip_batch(vae: KLVAE, seeds: range) -> dict[str, Tensor]:
    """Synthetic clips of every class for each seed, rendered in memory, as the autoencoder's latent batch."""
    synth = SyntheticConfig(
        resolution=DATA.resolution, duration=DATA.clip_seconds, sample_rate=DATA.mel.sample_rate
    )
    clips = [render_clip(class_id, seed, synth) for seed in seeds for class_id in range(NUM_CLASSES)]
    frames = torch.stack([to_model_frames(c.frames, DATA.resolution, DATA.frame_mode) for c in clips])
    pixels = {  # as SoundingVideoDataset's items
        "key_frames": frames[:, DATA.key_frame_indices],
        "target_frames": frames[:, TARGET_FRAMES],
        "target_indices": torch.tensor(TARGET_FRAMES).expand(len(clips), -1) / DATA.num_frames,
        "audio_image": waveform_to_audio_image(
            torch.from_numpy(np.stack([c.audio for c in clips])), DATA.mel
        ),
        "class_id": torch.tensor([c.class_id for c in clips]),
    }
    return pixels_to_latents(vae, pixels)


class FrozenEncoderMemo:
    """A frozen encoder's posterior of each input row, computed once: the training below sees the same 72
    clips (or, dropped by guidance dropout, zeros) again and again. Rows are independent (GroupNorm,
    no batch statistics), so this is the encoder's output."""

    def __init__(self, forward):
        self.forward, self.rows = forward, {}

    def __call__(self, x: Tensor) -> DiagonalGaussian:
        keys = [row.numpy().tobytes() for row in x]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        if missing:
            posterior = self.forward(x[missing])
            for row, i in enumerate(missing):
                self.rows[keys[i]] = posterior.mean[row], posterior.logvar[row]
        means, logvars = zip(*(self.rows[key] for key in keys), strict=True)
        return DiagonalGaussian(torch.stack(means), torch.stack(logvars))


@dataclass
class TrainedHead:
    model: MultiModalAutoencoder
    held_out: dict[str, Tensor]


@pytest.fixture(scope="module")
def trained_head() -> TrainedHead:
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(preset="tiny", block_out_channels=[16, 32], scale=1.0))  # random: 4 x 16 x 16
    # A random VAE's latents are ~0.05 in size: scale them to unit std, the rule of SD's scaling factor.
    vae.scale = 1.0 / latent_std(clip_batch(vae, range(1)))
    train, held_out = clip_batch(vae, range(12)), clip_batch(vae, range(100, 104))
    model = MultiModalAutoencoder(preset("ae", "tiny", resolution=32, vae_downsample=2), NUM_CLASSES)
    # What the class head needs trains: the semantic projectors and heads, on the latents of the
    # randomly initialised encoders (frozen: trained too, without the reconstruction that shapes
    # them, they held the head near chance for 250 steps of twice the cost). The
    # decoder's mse reaches the projectors only through zero-initialised context layers, so its UNet
    # pass, the slow part, is skipped (the mse terms become constants); every other loss term and
    # weight is the model's own: guidance dropout, posterior samples, KL, contrastive (w_con 0.1).
    for frozen in (model.video_encoder, model.audio_encoder, model.decoder):
        frozen.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model.decoder, "forward", lambda x_t, timesteps, cond: torch.zeros_like(x_t))
        for encoder in (model.video_encoder, model.audio_encoder):
            patch.setattr(encoder, "forward", FrozenEncoderMemo(encoder.forward))
        for _ in range(AE_STEPS):
            rows = torch.randperm(len(train["class_id"]), generator=generator)[:AE_BATCH]
            losses = model.training_losses({k: v[rows] for k, v in train.items()}, vae, generator=generator)
            optimizer.zero_grad()
            losses["loss"].backward()
            optimizer.step()
    return TrainedHead(model.eval(), held_out)


def latent_std(batch: dict[str, Tensor]) -> float:
    return torch.cat([batch["key_latents"].flatten(), batch["audio_latents"].flatten()]).std().item()


@torch.no_grad()
def held_out_accuracy(trained: TrainedHead) -> float:
    clips = trained.held_out
    z_v, z_a = trained.model.encode(clips["key_latents"], clips["audio_latents"])
    return round((trained.model.predict_class(z_v, z_a) == clips["class_id"]).float().mean().item(), 3)


def test_class_head_reads_held_out_clips_after_a_short_training(trained_head):
    accuracy = held_out_accuracy(trained_head)
    assert accuracy >= CHANCE + AE_MARGIN, (accuracy, f"chance {CHANCE:.3f}")


def test_class_head_is_at_chance_when_the_clip_cannot_reach_it(trained_head, monkeypatch):
    # The clip reaches the head only through its perceptual latents' semantic features: give the
    # projectors the null (zero) latents instead.
    model = trained_head.model
    semantics = model.semantics
    monkeypatch.setattr(
        model, "semantics", lambda z_v, z_a: semantics(torch.zeros_like(z_v), torch.zeros_like(z_a))
    )
    accuracy = held_out_accuracy(trained_head)
    assert accuracy <= CHANCE + CUT_TOLERANCE, (accuracy, f"chance {CHANCE:.3f}")
