"""Round-trip a sound through the MM-LDM audio image and a vocoder, and say how much it lost.

    python tools/audio_roundtrip.py IN --vocoder hifigan-universal --out OUT.wav [--image-size 256]

IN is a wav/flac/mp3 file or a video with an audio track, read mono at the MelConfig rate.
The chain is wave -> log-mel -> R x R audio image -> log-mel -> vocoder -> OUT.wav (PCM 16).
Exactly one JSON line goes to stdout; progress goes to stderr. Unreadable input or an unknown
vocoder exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import soundfile as sf
import torch

from mmldm_data.audio import (
    IMAGE_FLOOR_LOGMEL,
    MelConfig,
    audio_image_to_logmel,
    logmel_to_audio_image,
    mel_spectrogram,
    pad_or_trim,
)
from mmldm_data.media import MediaError, read_audio
from mmldm_data.vocoder import GRIFFIN_LIM, HIFIGAN_UNIVERSAL, load_vocoder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, help="audio file or video with an audio track")
    parser.add_argument(
        "--vocoder",
        default=HIFIGAN_UNIVERSAL,
        help=f"'{HIFIGAN_UNIVERSAL}', '{GRIFFIN_LIM}' or a HiFi-GAN checkpoint path",
    )
    parser.add_argument("--out", type=Path, required=True, help="output .wav")
    parser.add_argument("--image-size", type=int, default=MelConfig.image_size, help="audio image side R")
    parser.add_argument("--start", type=float, default=0.0, help="seconds to skip at the start of IN")
    parser.add_argument("--duration", type=float, default=None, help="seconds to read (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def floored_l1(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    floor = lambda logmel: logmel.clamp(min=IMAGE_FLOOR_LOGMEL)
    return (floor(estimate) - floor(reference)).abs().mean().item()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = MelConfig(image_size=args.image_size)
    try:
        samples = read_audio(args.input, cfg.sample_rate, start=args.start, duration=args.duration)
    except (MediaError, OSError) as error:
        print(f"audio_roundtrip: cannot read {args.input}: {error}", file=sys.stderr)
        return 2
    try:
        vocoder = load_vocoder(args.vocoder, cfg, args.device)
    except (FileNotFoundError, ValueError) as error:
        print(f"audio_roundtrip: {error}", file=sys.stderr)
        return 2

    wave = torch.from_numpy(samples).to(args.device)[None]
    wave = pad_or_trim(wave, max(wave.shape[-1], cfg.n_fft))  # the STFT needs one full window
    print(
        f"audio_roundtrip: {args.input}: {wave.shape[-1] / cfg.sample_rate:.2f} s at {cfg.sample_rate} Hz, "
        f"image {cfg.image_size}x{cfg.image_size}, vocoder {args.vocoder}",
        file=sys.stderr,
    )
    started = time.perf_counter()
    logmel = mel_spectrogram(wave, cfg)  # [1, n_mels, T]
    image = logmel_to_audio_image(logmel, cfg)  # [1, 3, R, R]
    decoded = audio_image_to_logmel(image, logmel.shape[-1], cfg)
    output = vocoder(decoded)  # [1, T * hop]
    elapsed = time.perf_counter() - started
    output_logmel = mel_spectrogram(output, cfg)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.out, output[0].cpu().numpy(), vocoder.sample_rate, subtype="PCM_16")
    report = {
        "input": str(args.input),
        "vocoder": args.vocoder,
        "out": str(args.out),
        "sample_rate": vocoder.sample_rate,
        "seconds": wave.shape[-1] / cfg.sample_rate,
        "frames": logmel.shape[-1],
        "image_size": cfg.image_size,
        # Against the input's log-mel, over the range an audio image holds ([-80, +20] dB: quieter
        # bins all become the floor colour): the image alone (uint8 + resizes), and the whole chain.
        "image_logmel_l1": floored_l1(decoded, logmel),
        "logmel_l1": floored_l1(output_logmel, logmel),
        # The whole chain down to the mel's own 1e-5 clamp (-100 dB), which the image cannot keep.
        "logmel_l1_full_range": (output_logmel - logmel).abs().mean().item(),
        "elapsed_s": round(elapsed, 3),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
