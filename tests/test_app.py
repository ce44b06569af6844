"""The web demo (tools/app.py): an a2v round trip through gradio_client against a tiny model folder, the
page without a model, and the spectrogram picture it shows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_tool
from media_factory import stream_seconds
from PIL import Image

from mmldm_data.audio import MelConfig
from mmldm_data.media import write_audio
from mmldm_dit import MMLDMPipeline


@pytest.fixture(scope="module")
def app():
    """tools/app.py, imported when a test needs it: gradio takes seconds to import."""
    return load_tool("app.py")


def test_spectrogram_shows_a_low_tone_below_a_high_one(app):
    mel = MelConfig(sample_rate=16000, filterbank_rate=16000)
    time = np.arange(16000) / 16000
    brightest_row = [
        app.spectrogram_image(np.sin(2 * np.pi * hz * time).astype(np.float32), mel).sum(axis=(1, 2)).argmax()
        for hz in (300, 3000)
    ]
    assert brightest_row[0] > brightest_row[1]  # row 0 is the top of the picture


def test_without_a_model_folder_the_page_says_how_to_make_one(app):
    page = app.build_app(None, "outputs/nowhere")
    components = page.config["components"]
    text = " ".join(str(c["props"].get("value")) for c in components if c["type"] == "markdown")
    assert "`outputs/nowhere`" in text and "`make demo`" in text and "tools/export_model.py" in text
    assert not any(c["type"] in ("button", "tabs") for c in components)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning")  # inside gradio's queue
def test_a2v_through_gradio_client_gives_an_mp4_with_the_sound_and_its_spectrogram(
    app, tiny_model_folder, tmp_path, plain_single_thread_cpu
):
    from gradio_client import Client, handle_file

    pipe = MMLDMPipeline.from_pretrained(tiny_model_folder, vocoder="griffinlim")
    song = tmp_path / "song.wav"
    write_audio(song, 0.3 * np.sin(np.linspace(0, 2000, int(1.3 * pipe.sample_rate))), pipe.sample_rate)
    page = app.build_app(pipe, str(tiny_model_folder))
    page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        client = Client(page.local_url, verbose=False)
        endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert set(endpoints) == {"/svg", "/a2v", "/v2a"}
        # sound, seconds (0: the sound's), seed, DiT steps, autoencoder steps
        video, spectrogram, facts = client.predict(handle_file(song), 0, 0, 1, 1, api_name="/a2v")
    finally:
        page.close()
    video_seconds, audio_seconds, frames = stream_seconds(video)
    assert frames == 13 and video_seconds == pytest.approx(1.3, abs=0.1)
    assert audio_seconds == pytest.approx(1.3, abs=0.05)
    assert Image.open(spectrogram).size == (720, 240)
    assert facts.startswith("a2v: 13 frames at 10 fps with 1.30 s of sound at 44100 Hz")
