#!/usr/bin/env python
"""Does a trained DiT use its cross-modal condition, and does the decoder? (issue 13, item 3)

    python tools/probe_conditioning.py outputs/demo/runs/dit            # a tools/train_dit.py run
    python tools/probe_conditioning.py outputs/demo/runs/dit --decoder  # also the autoencoder's decoder

Reads the run's own latent cache (training windows) and measures, without decoding anything:
  * class separation: per modality, the closest pair of class centroids of the standardised latents
    and their distance, beside the median pair's and a window's mean distance to its own centroid
    (classes whose centroids lie close are the ones a condition is mistaken between);
  * loss gain: per noise level t, how much the generated modality's loss falls when the other
    modality's clean latent is given as the condition (a2v: the video's loss; v2a: the audio's). A
    model that ignores its condition gains 0%. Beside it, the loss given the latent of another clip
    of the same class: as low as with the true one when the model takes only the class from its
    condition, not the clip's own timing (docs/design.md#key-frame-tokens);
  * latent-space accuracy: a2v / v2a samples for `--per-class` windows of every class, read as the
    class of the nearest class centroid of the real (standardised) latents, at each `--guidance`,
    and with the condition embedding cut (zeroed weights: only the noised given latent reaches the
    model); svg agreement of joint samples; the same reading of the real latents is the ceiling.
With --decoder: clips decoded from mismatched latents (a video latent of one class with an audio latent
of another) and read by the synthetic oracles: does each decoded modality follow its own latent or the
other's (the decoder sees the other modality through its semantic tokens and the class head)?
Prints tables and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from mmldm_ae.engine.diffusion import build_train_scheduler, diffusion_target, q_sample
from mmldm_ae.engine.latent_cache import LatentCacheError
from mmldm_ae.vae import VAELoadError
from mmldm_data.cli import user_errors
from mmldm_data.config import ConfigError
from mmldm_data.metrics.oracle import read_oracles
from mmldm_data.synthetic import CLASS_SETS, oracle_class_set
from mmldm_dit.generate import TrainedDiT, decode_media, load_trained_dit
from mmldm_dit.latents import DiTLatentDataset
from mmldm_dit.sampling import sample

NOISE_LEVELS = (999, 900, 700, 500, 300, 100)
CONDITIONED = {"a2v": ("audio", "video"), "v2a": ("video", "audio")}  # task: (given, generated)


class Latents:
    """A cache's standardised latents, class ids and per-class centroids."""

    def __init__(self, dit: TrainedDiT, cache: DiTLatentDataset):
        count = cache.index["count"]
        raw = [cache.latents(i) for i in range(count)]
        self.z = {
            "audio": dit.standardise("audio", torch.stack([a for a, _ in raw]).float()),
            "video": dit.standardise("video", torch.stack([v for _, v in raw]).float()),
        }
        self.classes = torch.tensor(cache.index["class_ids"])
        self.files = torch.tensor([file for file, _ in cache.index["windows"]])
        self.class_names = cache.class_names
        self.centroids = {
            m: torch.stack([z[self.classes == k].flatten(1).mean(0) for k in range(len(self.class_names))])
            for m, z in self.z.items()
        }

    def read(self, modality: str, z: Tensor) -> Tensor:
        """Class of the nearest centroid [B]."""
        return torch.cdist(z.flatten(1).float(), self.centroids[modality]).argmin(1)

    def separation(self, modality: str) -> dict:
        """How far apart the class centroids are, against how far a window lies from its own: the
        closest pair (the classes a condition is most easily mistaken between) and the median pair."""
        z, centroids = self.z[modality].flatten(1), self.centroids[modality]
        spread = (z - centroids[self.classes]).norm(dim=1).mean().item()
        distances = torch.cdist(centroids, centroids)
        pairs = torch.triu_indices(len(centroids), len(centroids), offset=1)
        between = distances[pairs[0], pairs[1]]
        closest = between.argmin()
        first, second = (self.class_names[k] for k in pairs[:, closest].tolist())
        return {
            "closest": f"{first} / {second}",
            "closest_distance": between[closest].item(),
            "median_distance": between.median().item(),
            "spread": spread,
        }

    def other_clip(self, rows: Tensor, generator: torch.Generator) -> Tensor:
        """For each window, a window of another clip of the same class (of its own clip, at another
        start, where the class has one clip only)."""
        others = []
        for row in rows.tolist():
            same_class = self.classes == self.classes[row]
            other_clip = same_class & (self.files != self.files[row])
            pool = other_clip if other_clip.any() else same_class & (torch.arange(len(same_class)) != row)
            if not pool.any():
                raise LatentCacheError(f"class {self.class_names[self.classes[row]]} has one window only")
            same = torch.nonzero(pool)[:, 0]
            others.append(same[torch.randint(len(same), (1,), generator=generator)].item())
        return torch.tensor(others)

    def picks(self, per_class: int) -> Tensor:
        """`per_class` windows of every class, evenly spread."""
        chosen = []
        for k in range(len(self.class_names)):
            windows = torch.nonzero(self.classes == k)[:, 0]
            chosen.append(windows[torch.linspace(0, len(windows) - 1, min(per_class, len(windows))).long()])
        return torch.cat(chosen)


def outputs_loss(model, noisy: dict, target: dict, t: Tensor, **condition: Tensor) -> dict[str, float]:
    """Per modality: MSE of the model's output against its target (epsilon or v)."""
    out = dict(zip(("audio", "video"), model(noisy["audio"], noisy["video"], t, **condition), strict=True))
    return {m: (out[m].float() - target[m]).pow(2).mean().item() for m in out}


@torch.no_grad()
def loss_gain(dit: TrainedDiT, latents: Latents, windows: int, seed: int) -> list[dict]:
    """Per noise level: the generated modality's loss joint vs given the other's clean latent, and given
    that of another clip of the same class."""
    model = dit.model
    scheduler = build_train_scheduler(model.cfg.schedule)
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(latents.classes), generator=generator)[:windows]
    z = {m: latents.z[m][rows] for m in ("audio", "video")}
    other_rows = latents.other_clip(rows, generator)
    results = []
    for level in NOISE_LEVELS:
        t = torch.full((len(rows),), level)
        noise = {m: torch.randn(x.shape, generator=generator) for m, x in z.items()}
        noisy = {m: q_sample(scheduler, x, noise[m], t) for m, x in z.items()}
        target = {m: diffusion_target(scheduler, x, noise[m], t) for m, x in z.items()}

        joint = outputs_loss(model, noisy, target, t)
        row = {"t": level}
        for task, (given, generated) in CONDITIONED.items():
            conditioned = outputs_loss(model, noisy, target, t, **{f"cond_{given[0]}": z[given]})
            other = outputs_loss(
                model, noisy, target, t, **{f"cond_{given[0]}": latents.z[given][other_rows]}
            )
            row[task] = {
                "joint": joint[generated],
                "given": conditioned[generated],
                "other": other[generated],
            }
        results.append(row)
    return results


def change(losses: dict[str, float]) -> str:
    """ "31% lower" / "2% higher": the given condition's effect on the loss."""
    percent = 100 * (1 - losses["given"] / losses["joint"])
    return f"{abs(percent):.0f}% {'lower' if percent >= 0 else 'higher'}"


@contextmanager
def condition_cut(dit: TrainedDiT, modality: str, cut: bool = True) -> Iterator[None]:
    """Inside, with `cut`: `modality`'s condition embedding outputs zero (weights put back after)."""
    parameters = list(dit.model.tokens.modalities[modality].condition_embed.parameters()) if cut else []
    saved = [p.detach().clone() for p in parameters]
    for parameter in parameters:
        parameter.data.zero_()
    try:
        yield
    finally:
        for parameter, value in zip(parameters, saved, strict=True):
            parameter.data.copy_(value)


def latent_accuracy(dit: TrainedDiT, latents: Latents, args) -> dict[str, float]:
    picks = latents.picks(args.per_class)
    truth = latents.classes[picks]
    results = {}
    for guidance in args.guidance:
        common = dict(steps=args.steps, guidance_audio=guidance, guidance_video=guidance, seed=args.seed)
        for task, (given, generated) in CONDITIONED.items():
            for cut in (False, True):
                with condition_cut(dit, given, cut):
                    z_a, z_v = sample(
                        dit.model, task, **{f"cond_{given[0]}": latents.z[given][picks]}, **common
                    )
                made = z_v if generated == "video" else z_a
                name = f"{task} s={guidance:g}" + (" condition embedding cut" if cut else "")
                results[name] = (latents.read(generated, made) == truth).float().mean().item()
        z_a, z_v = sample(dit.model, "svg", batch_size=len(picks), **common)
        results[f"svg agreement s={guidance:g}"] = (
            (latents.read("audio", z_a) == latents.read("video", z_v)).float().mean().item()
        )
    for modality in ("audio", "video"):
        results[f"ceiling: real {modality} latents"] = (
            (latents.read(modality, latents.z[modality]) == latents.classes).float().mean().item()
        )
    return results


def decoder_swap(dit: TrainedDiT, latents: Latents, seed: int) -> dict[str, float]:
    """Decode (video latent of class a, audio latent of class b) for all a and b in {a, a+1, a+3}."""
    classes = len(latents.class_names)
    one_per_class = latents.picks(1)
    pairs = [(a, (a + shift) % classes) for a in range(classes) for shift in (0, 1, 3)]
    z_v = torch.stack([latents.z["video"][one_per_class[a]] for a, _ in pairs])
    z_a = torch.stack([latents.z["audio"][one_per_class[b]] for _, b in pairs])
    raw = {
        "video": dit.unstandardise("video", z_v)[:, None],
        "audio": dit.unstandardise("audio", z_a)[:, None],
    }
    media = decode_media(dit.pipeline, raw, seed=seed)
    config = dit.pipeline.dataset
    classes = oracle_class_set(config.data_root)  # the set the DiT was trained on
    oracle_class = [CLASS_SETS[classes].index(name) for name in latents.class_names]
    counts = {key: 0 for key in ("video own", "video other", "audio own", "audio other")}
    matched_right = 0
    for (a, b), clip in zip(pairs, media, strict=True):
        reading = read_oracles(clip.frames, clip.wave, config.fps, config.mel.sample_rate, classes)
        if a == b:
            matched_right += (reading.video_class == oracle_class[a]) + (
                reading.audio_class == oracle_class[a]
            )
            continue
        counts["video own"] += reading.video_class == oracle_class[a]
        counts["video other"] += reading.video_class == oracle_class[b]
        counts["audio own"] += reading.audio_class == oracle_class[b]
        counts["audio other"] += reading.audio_class == oracle_class[a]
    mismatched = len(pairs) - classes
    result = {f"mismatched: {key}": value / mismatched for key, value in counts.items()}
    result["matched: read right"] = matched_right / (2 * classes)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="a tools/train_dit.py run (or checkpoint) of a joint DiT")
    parser.add_argument("--per-class", type=int, default=6, help="a2v / v2a conditions per class")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="paper Eq. 9 s values")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of the DiT")
    parser.add_argument("--windows", type=int, default=128, help="windows behind the loss-gain table")
    parser.add_argument("--decoder", action="store_true", help="also decode mismatched latents (slower)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.per_class < 1 or args.windows < 1 or args.steps < 1:
        parser.error("--per-class, --windows and --steps must be >= 1")

    with user_errors("probe_conditioning", VAELoadError, LatentCacheError):
        torch.manual_seed(args.seed)
        dit = load_trained_dit(args.run)
        if not dit.model.cfg.joint:
            raise ConfigError(f"{args.run} is a single-modal DiT; a2v / v2a need one of both modalities")
        if dit.latent_cache is None or not Path(dit.latent_cache).is_dir():
            raise LatentCacheError(f"{args.run}: its latent cache ({dit.latent_cache}) is missing")
        latents = Latents(dit, DiTLatentDataset(dit.latent_cache))
        print(f"{args.run}: {dit.model.cfg.schedule.prediction_type} prediction", file=sys.stderr)

        separation = {modality: latents.separation(modality) for modality in ("audio", "video")}
        print("\n| latent | closest class centroids | distance | median pair | window to its centroid |")
        print("|---|---|---|---|---|")
        for modality, row in separation.items():
            print(
                f"| {modality} | {row['closest']} | {row['closest_distance']:.2f} "
                f"| {row['median_distance']:.2f} | {row['spread']:.2f} |"
            )
        gain = loss_gain(dit, latents, args.windows, args.seed)
        print(
            "\n| t | a2v: video loss, joint -> audio given (another clip's) "
            "| v2a: audio loss, joint -> video given (another clip's) |"
        )
        print("|---|---|---|")
        for row in gain:
            cells = [
                f"{row[task]['joint']:.4f} -> {row[task]['given']:.4f} ({change(row[task])}) "
                f"({row[task]['other']:.4f})"
                for task in CONDITIONED
            ]
            print(f"| {row['t']} | {cells[0]} | {cells[1]} |")
        accuracy = latent_accuracy(dit, latents, args)
        chance = 1 / len(latents.class_names)
        print(f"\nlatent-space class accuracy ({args.per_class} per class, chance {chance:.3f})")
        for name, value in accuracy.items():
            print(f"  {name}: {value:.3f}")
        swap = decoder_swap(dit, latents, args.seed) if args.decoder else {}
        if swap:
            print("\ndecoder given mismatched latents (oracle readings)")
            for name, value in swap.items():
                print(f"  {name}: {value:.2f}")
    report = {"separation": separation, "loss_gain": gain, "latent_accuracy": accuracy, "decoder": swap}
    print(json.dumps({"run": str(args.run), **report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
