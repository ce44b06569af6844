#!/usr/bin/env python
"""How visible the joins between decoded clips are, on real consecutive windows.

    python tools/measure_joins.py AE_RUN --clips-dir outputs/demo/heldout --num-clips 6 --ae-steps 10

Each clip (two windows long, one join) is encoded window by window and decoded three ways: clip by
clip with the decoder noise running on and each clip vocoded alone (how long samples were decoded
before), with one decoder noise and one vocoding but no dissolve, and as `decode_media` does now. The
content is continuous across the join, so any excess of the join difference over the within-clip
difference of consecutive frames (and log-mel frames) comes from decoding; the real clips' own ratio is
the reference. Prints one JSON line per case.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mmldm_ae.pipeline import load_autoencoder
from mmldm_data.audio import mel_spectrogram, waveform_to_audio_image
from mmldm_dit.generate import JOIN_FRAMES, JOIN_MEL_FRAMES, SampleMedia, decode_media, read_given

WINDOWS = 2  # one join per clip


def clip_by_clip(pipe, latents: dict, steps: int, seed: int) -> list[SampleMedia]:
    """The decoding before joins were handled: each clip decoded and vocoded on its own."""
    cfg = pipe.dataset
    batch, clips = latents["video"].shape[:2]
    generator = torch.Generator(pipe.device).manual_seed(seed)
    frames, waves = [], []
    for clip in range(clips):
        decoded = pipe.decode_clips(
            latents["video"][:, clip], latents["audio"][:, clip], steps=steps, generator=generator
        )
        media = pipe.to_media(decoded.audio_images, decoded.frames)
        frames.append([f for f, _ in media])
        waves.append(
            [np.pad(w, (0, max(0, cfg.clip_samples - len(w))))[: cfg.clip_samples] for _, w in media]
        )
    return [
        SampleMedia(np.concatenate([f[b] for f in frames]), np.concatenate([w[b] for w in waves]))
        for b in range(batch)
    ]


def seam_figures(pipe, media: list[SampleMedia]) -> dict:
    """Mean |difference| of consecutive frames / log-mel frames at the joins and within clips."""
    cfg = pipe.dataset
    join_v, within_v, join_a, within_a = [], [], [], []
    for m in media:
        diff = np.abs(np.diff(m.frames.astype(np.float32) / 255, axis=0)).mean(axis=(1, 2, 3))
        at_join = np.zeros(len(diff), bool)
        at_join[np.arange(cfg.num_frames - 1, len(diff), cfg.num_frames)] = True
        join_v += list(diff[at_join])
        within_v += list(diff[~at_join])
        mel = mel_spectrogram(torch.from_numpy(m.wave)[None], cfg.mel)[0].numpy()
        diff_mel = np.abs(np.diff(mel, axis=1)).mean(axis=0)
        near_join = np.zeros(len(diff_mel), bool)
        for sample in np.arange(1, len(m.frames) // cfg.num_frames) * cfg.clip_samples:
            column = sample // cfg.mel.hop_length
            near_join[max(0, column - 2) : column + 2] = True
        join_a += list(diff_mel[near_join])
        within_a += list(diff_mel[~near_join])
    jv, wv, ja, wa = (float(np.mean(x)) for x in (join_v, within_v, join_a, within_a))
    return {"frame_ratio": round(jv / wv, 2), "mel_ratio": round(ja / wa, 2), "joins": len(join_v)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ae_run", type=Path, help="a tools/train_ae.py run folder")
    parser.add_argument(
        "--clips-dir", type=Path, required=True, help="a folder of mp4 clips (searched recursively)"
    )
    parser.add_argument("--num-clips", type=int, default=6)
    parser.add_argument("--ae-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = load_autoencoder(args.ae_run)
    cfg = pipe.dataset
    files = sorted(args.clips_dir.rglob("*.mp4"))[: args.num_clips]
    if not files:
        print(
            f"measure_joins: no .mp4 files under {args.clips_dir}; give --clips-dir a folder of clips",
            file=sys.stderr,
        )
        return 2
    seconds = WINDOWS * cfg.clip_seconds
    real, v_windows, a_windows = [], [], []
    for path in files:
        video, audio = (read_given(cfg, str(path), kind, seconds) for kind in ("video", "audio"))
        real.append(SampleMedia(video.data, audio.data))
        v_windows.append(video.windows)  # [W, T, 3, R, R]
        a_windows.append(audio.windows)  # [W, samples]
    v, a = torch.stack(v_windows), torch.stack(a_windows)
    z_v, z_a = pipe.encode_clips(
        {
            "key_frames": v.flatten(0, 1)[:, cfg.key_frame_indices],
            "audio_image": waveform_to_audio_image(a.flatten(0, 1), cfg.mel),
        }
    )
    latents = {
        "video": z_v.unflatten(0, (len(files), WINDOWS)),
        "audio": z_a.unflatten(0, (len(files), WINDOWS)),
    }
    cases = {
        f"real clips ({len(files)})": lambda: real,
        "decoded clip by clip (before)": lambda: clip_by_clip(pipe, latents, args.ae_steps, args.seed),
        "one decoder noise + one vocoding, no dissolve": lambda: decode_media(
            pipe, latents, args.ae_steps, seed=args.seed, join_frames=0, join_mel_frames=0
        ),
        f"dissolves {JOIN_FRAMES} frames / {JOIN_MEL_FRAMES} mel frames (now)": lambda: decode_media(
            pipe, latents, args.ae_steps, seed=args.seed
        ),
    }
    for i, (case, media) in enumerate(cases.items(), 1):
        print(json.dumps({"case": case, **seam_figures(pipe, media())}), flush=True)
        print(f"[{i}/{len(cases)}] {case}", file=sys.stderr, flush=True)
    print("join / within-clip ratios: 1 = no seam; the real clips' ratio is the reference", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
