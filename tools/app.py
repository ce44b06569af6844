#!/usr/bin/env python
r"""A web demo of an exported MM-LDM model: sounding videos from noise, from a sound or from a video.

    make app                                              # the model `make demo` exports, on 127.0.0.1:7860
    make app MODEL=path/to/model ARGS="--port 7861"
    python tools/app.py path/to/model --vocoder griffinlim   # a folder of tools/export_model.py

One tab per task: svg (sound and video from noise), a2v (a video for an uploaded or recorded sound),
v2a (a sound for an uploaded or recorded video). Each shows the generated mp4 with its sound, the
spectrogram of that sound and the sampler's progress. Without a model folder the page says how to
make one. Serves this machine only by default; offline: gradio's analytics are off and its fonts
ship with it. The same tabs answer gradio_client (`/svg`, `/a2v`, `/v2a`).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from mmldm_ae.vae import VAELoadError
from mmldm_data.audio import MelConfig, mel_spectrogram
from mmldm_data.cli import user_errors
from mmldm_data.config import ConfigError
from mmldm_data.media import MediaError
from mmldm_data.preview import spectrogram_rgb
from mmldm_dit import MMLDMPipeline

# Read by gradio whenever it would report usage, so set before any page is built.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

DEFAULT_MODEL = "outputs/demo/model"
# Each tab: what it says, and the pipeline argument its uploaded or recorded file goes to (svg: none).
TASKS = {
    "svg": ("Sound and video together, from noise: one clip.", None),
    "a2v": ("A video for a sound: upload an audio file or record one with the microphone.", "audio"),
    "v2a": ("A sound for a video: upload a video or record one with the webcam.", "video"),
}
# Pixels: mel bands and frames are repeated so that a short sound's 80 x 100 or so read at a glance.
SPECTROGRAM_SIZE = (720, 240)
# Gradio fills a parameter with this default with a tracker that shows the sampler's tqdm bars.
TRACK_TQDM = gr.Progress(track_tqdm=True)


def spectrogram_image(waveform: np.ndarray, mel: MelConfig) -> np.ndarray:
    """The log-mel of a mono `waveform [N]` as an RGB image [240, >= 720, 3], low pitches at the bottom."""
    wave = torch.from_numpy(np.asarray(waveform, dtype=np.float32).reshape(-1))
    wave = torch.nn.functional.pad(wave, (0, max(0, mel.n_fft - wave.numel())))  # too short a sound: silence
    image = Image.fromarray(spectrogram_rgb(mel_spectrogram(wave[None], mel)[0]))
    width = max(image.width, SPECTROGRAM_SIZE[0])
    return np.asarray(image.resize((width, SPECTROGRAM_SIZE[1]), Image.Resampling.NEAREST))


class Generator:
    """Runs one task of a loaded pipeline for the page and writes its mp4 into a folder of its own."""

    def __init__(self, pipe: MMLDMPipeline, out_dir: Path):
        self.pipe, self.out_dir, self.count = pipe, out_dir, 0

    def __call__(
        self,
        task: str,
        condition: str | None,
        seconds: float | None,
        seed: float,
        steps: float,
        ae_steps: float,
        progress: gr.Progress = TRACK_TQDM,  # not called here: it follows the pipeline's tqdm bars
    ) -> tuple[str, np.ndarray, str]:
        """(mp4 path, spectrogram image, one line of facts). condition: the a2v sound or v2a video file;
        seconds: a2v / v2a output length (0: the input's)."""
        given = TASKS[task][1]
        if given and not condition:
            raise gr.Error(f"{task} needs an input {given} file: upload or record one first.")
        inputs = {given: condition, "seconds": seconds or None} if given else {}
        seed, steps, ae_steps = int(seed), int(steps), int(ae_steps)
        print(f"app: {task} seed={seed} steps={steps} ae_steps={ae_steps} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            out = self.pipe(task=task, seed=seed, steps=steps, ae_steps=ae_steps, **inputs)
        except (ConfigError, MediaError) as error:  # a bad input: said on the page, the app goes on
            raise gr.Error(str(error)) from error
        self.count += 1
        path = out.save(self.out_dir / f"{self.count:04d}_{task}.mp4")
        facts = (
            f"{task}: {len(out.frames)} frames at {out.fps:g} fps with {out.seconds:.2f} s of sound at "
            f"{out.sample_rate} Hz; seed {seed}, {steps} + {ae_steps} steps; "
            f"{time.perf_counter() - start:.1f} s"
        )
        print(f"app: {facts} -> {path}", file=sys.stderr, flush=True)
        return str(path), spectrogram_image(out.waveform, self.pipe.dataset.mel), facts


def task_tab(task: str, generator: Generator, steps: int, ae_steps: int) -> None:
    """One tab: the task's input, its settings, a button, and the mp4 + spectrogram it makes."""
    says, given = TASKS[task]
    gr.Markdown(says)
    with gr.Row():
        with gr.Column():
            # svg takes no file and no length: hidden constants keep one signature for every tab.
            condition, seconds = gr.State(None), gr.State(None)
            if given == "audio":
                condition = gr.Audio(sources=["upload", "microphone"], type="filepath", label="Sound")
            elif given == "video":
                condition = gr.Video(sources=["upload", "webcam"], label="Video")
            if given:
                seconds = gr.Slider(0, 30, value=0, step=0.1, label=f"Seconds (0: as long as the {given})")
            seed = gr.Number(0, precision=0, label="Seed")
            steps_box = gr.Slider(1, 100, value=steps, step=1, label="Sampling steps (DiT)")
            ae_steps_box = gr.Slider(1, 100, value=ae_steps, step=1, label="Decoding steps (autoencoder)")
            button = gr.Button("Generate", variant="primary")
        with gr.Column():
            # The ids let tools/browser_check.py find the outputs of the tab it checks.
            result = gr.Video(
                label="Generated video with sound", interactive=False, height=360, elem_id=f"{task}-result"
            )
            spectrogram = gr.Image(
                label="Spectrogram of its sound",
                interactive=False,
                format="png",
                elem_id=f"{task}-spectrogram",
            )
            facts = gr.Markdown()
    button.click(
        functools.partial(generator, task),
        inputs=[condition, seconds, seed, steps_box, ae_steps_box],
        outputs=[result, spectrogram, facts],
        api_name=task,
        # One sample at a time over all tabs: they share one model and the machine's cores.
        concurrency_limit=1,
        concurrency_id="generate",
    )


def build_app(
    pipe: MMLDMPipeline | None, model_dir: str | None, steps: int = 25, ae_steps: int | None = None
) -> gr.Blocks:
    """The page: a tab per task of `pipe` (svg / a2v / v2a), or, without one, how to make a model folder."""
    with gr.Blocks(title="MM-LDM demo", analytics_enabled=False) as app:
        gr.Markdown("# MM-LDM: sounding videos from one model")
        if pipe is None:
            where = (
                f"There is no model folder at `{model_dir}`." if model_dir else "No model folder was given."
            )
            gr.Markdown(
                f"## No model yet\n\n{where}\n\n"
                "Make one on this machine (about 15 minutes on a CPU): `make demo` trains the tiny model "
                f"on the synthetic set and exports it to `{DEFAULT_MODEL}`. Then start this page again: "
                "`make app`.\n\nA model of your own: `python tools/export_model.py RUN --out DIR`, then "
                "`make app MODEL=DIR`."
            )
            return app
        gr.Markdown(
            f"Model `{model_dir}`: {pipe.clip_seconds:g} s clips at {pipe.fps:g} fps, "
            f"sound at {pipe.sample_rate} Hz."
        )
        # The decoder's own measured default (ae.decode_steps) unless the command line asks otherwise.
        ae_steps = ae_steps or pipe.autoencoder.model.cfg.decode_steps
        generator = Generator(pipe, Path(tempfile.mkdtemp(prefix="mmldm-app-")))
        with gr.Tabs():
            for task in TASKS:
                if task in pipe.tasks:
                    with gr.Tab(task):
                        task_tab(task, generator, steps, ae_steps)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="a folder of tools/export_model.py")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: this machine only)"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--steps", type=int, default=25, help="DiT sampling steps the page starts with")
    parser.add_argument(
        "--ae-steps", type=int, help="autoencoder decoding steps it starts with (default: the model's own)"
    )
    parser.add_argument("--vocoder", help="hifigan-universal or griffinlim (default: the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    pipe = None
    if Path(args.model).is_dir():
        print(f"app: loading {args.model} on {args.device} ...", file=sys.stderr, flush=True)
        with user_errors("app", VAELoadError):
            pipe = MMLDMPipeline.from_pretrained(args.model, device=args.device, vocoder=args.vocoder)
    else:
        print(f"app: no model folder at {args.model}: the page says how to make one", file=sys.stderr)
    app = build_app(pipe, args.model, args.steps, args.ae_steps)
    print(f"app: serving on http://{args.host}:{args.port} (Ctrl+C stops it)", file=sys.stderr, flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=False, show_error=True, quiet=True)


if __name__ == "__main__":
    main()
