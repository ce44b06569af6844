#!/usr/bin/env python
r"""The web demo in a real headless browser: start `tools/app.py`, make one sample, take a screenshot.

    make browser-check                                  # the model `make demo` exports: a2v of a chirp
    python tools/browser_check.py path/to/model --task svg --out /tmp/svg.png
    python tools/browser_check.py path/to/model --task v2a --input clip.mp4
    python tools/browser_check.py --url http://127.0.0.1:7860/   # an app that is already running

Chromium (Debian: `apt-get install chromium`) runs headless with a new empty profile and its
network services off, driven through the DevTools protocol over a pipe (no Python package needed).
The check opens the page, picks the task's tab, uploads the input (a2v: --input or a generated
2.5 s chirp; v2a: --input), presses Generate, waits for the mp4 and the spectrogram, checks that the
browser can play the video (its length, a decoded frame), and saves a full-page screenshot
(default docs/app_screenshot.png). Without a model folder it checks the page that says how to make
one. Exits 1 naming the step that failed; ends with one JSON line of what the browser saw.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave as wave_file
from collections.abc import Iterator
from pathlib import Path
from string import Template

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
]
WIDTH = 1280
DEFAULT_MODEL = "outputs/demo/model"  # what `make demo` exports; tools/app.py's default too


class CheckError(Exception):
    pass


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: JSON messages ending in NUL on fds 3 / 4."""

    def __init__(self, chromium: str, profile: Path):
        commands, self._write = os.pipe()
        self._read, replies = os.pipe()
        # The child reads commands on fd 3 and writes replies on fd 4. Its ends go above 4 first, so that
        # neither dup2 overwrites the other; dup2 leaves 3 and 4 open across exec (close_fds=False keeps
        # them; every other descriptor of this process is close-on-exec).
        child_ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands, replies)]
        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=lambda: (os.dup2(child_ends[0], 3), os.dup2(child_ends[1], 4)),
        )
        for fd in (commands, replies, *child_ends):
            os.close(fd)
        self._buffer, self._next_id, self.session = b"", 0, None

    def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        """Send one command (to the attached page once there is one) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise CheckError(f"the browser refused {method}: {reply['error'].get('message')}")
                return reply.get("result", {})
        raise CheckError(f"the browser did not answer {method} within {timeout:.0f} s")

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if self.process.poll() is not None:
                raise CheckError(f"chromium exited with status {self.process.returncode}")
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise CheckError("the browser stopped answering on its DevTools pipe")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise CheckError("the browser closed its DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise CheckError(
                f"page script failed: {result['exceptionDetails'].get('text')} in {expression!r}"
            )
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float):
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.5)
        raise CheckError(f"timed out after {timeout:.0f} s waiting for {what}")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        os.close(self._read)
        os.close(self._write)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


@contextlib.contextmanager
def served_app(model: str, steps: int, timeout: float = 180.0) -> Iterator[str]:
    """tools/app.py on a free local port; its URL once it answers. Its output goes to this stderr."""
    port = free_port()
    print(f"browser_check: starting tools/app.py on port {port} ...", file=sys.stderr, flush=True)
    command = [sys.executable, str(REPO_ROOT / "tools" / "app.py"), model]
    server = subprocess.Popen([*command, "--port", str(port), "--steps", str(steps)], stdout=sys.stderr)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while not answers(url):
            if server.poll() is not None:
                raise CheckError(f"tools/app.py exited with status {server.returncode} before serving")
            if time.monotonic() > deadline:
                raise CheckError(f"tools/app.py did not serve on port {port} within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


# Page scripts. Gradio renders tabs and buttons as <button>s, and keeps other tabs' content in the page
# hidden: pick them by selector, visible text and visibility.
CLICK_BUTTON = """(() => {{
  const button = [...document.querySelectorAll({selector})].find(
    b => b.innerText.trim() === {text} && b.checkVisibility());
  if (!button) return false;
  button.click();
  return true;
}})()"""
# The task's generated video and spectrogram (tools/app.py gives them the ids <task>-result and
# <task>-spectrogram), once the browser knows the video's length: it could read the mp4.
PLAYABLE_VIDEO = Template("""(() => {
  const error = document.querySelector('.toast-body.error');
  if (error) return {error: error.innerText};
  const video = document.querySelector('#$task-result video');
  const image = document.querySelector('#$task-spectrogram img');
  if (!video || !video.currentSrc || video.readyState < 1 || !image || !image.complete || !image.naturalWidth)
    return null;
  return {duration: video.duration, width: video.videoWidth, height: video.videoHeight,
          spectrogram: [image.naturalWidth, image.naturalHeight]};
})()""")
# Shows the generated video's middle frame rather than its first (often a fade from black); whether the
# browser decoded a frame there.
SHOW_MIDDLE_FRAME = Template("""new Promise(resolve => {
  const video = document.querySelector('#$task-result video');
  video.addEventListener('seeked', () => resolve(video.readyState >= 2), {once: true});
  video.currentTime = video.duration / 2;
  setTimeout(() => resolve(false), 10000);
})""")

# The visible tab's "Drop ... Here - or - Click to Upload" prompt: gone once an upload has arrived.
UPLOAD_PROMPT = """[...document.querySelectorAll('button')].some(
  b => b.checkVisibility() && b.innerText.includes('Click to Upload'))"""
# Gradio hides the <input type=file> itself; the block around it shows whether it is on the visible tab.
IS_VISIBLE_FILE_INPUT = "(input => input.closest('.block')?.checkVisibility())"
VISIBLE_FILE_INPUT = f"[...document.querySelectorAll('input[type=file]')].some({IS_VISIBLE_FILE_INPUT})"


def click(selector: str, text: str) -> str:
    """A page script: click the visible `selector` button showing `text`; whether there was one."""
    return CLICK_BUTTON.format(selector=json.dumps(selector), text=json.dumps(text))


def upload(tools: DevTools, path: Path) -> None:
    """Put `path` into the visible tab's file input, as a user choosing it in the file dialog would."""
    tools.wait_for(VISIBLE_FILE_INPUT, "the tab's file input", 30)  # a tab renders when first shown
    document = tools.send("DOM.getDocument", depth=0)["root"]["nodeId"]
    nodes = tools.send("DOM.querySelectorAll", nodeId=document, selector="input[type=file]")["nodeIds"]
    for node in nodes:
        handle = tools.send("DOM.resolveNode", nodeId=node)["object"]["objectId"]
        visible = tools.send(
            "Runtime.callFunctionOn",
            objectId=handle,
            functionDeclaration=f"function() {{ return {IS_VISIBLE_FILE_INPUT}(this); }}",
            returnByValue=True,
        )
        if visible["result"].get("value"):
            tools.send("DOM.setFileInputFiles", nodeId=node, files=[str(path.resolve())])
            return
    raise CheckError("the tab has no visible file input to upload into")


def screenshot(tools: DevTools, out: Path) -> Path:
    """The whole page (not just the window) as a PNG at `out`."""
    height = tools.evaluate("document.documentElement.scrollHeight")
    tools.send(
        "Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False
    )
    time.sleep(1.0)  # layout settles at the new size
    data = tools.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(data))
    return out


def check(args: argparse.Namespace, tools: DevTools, url: str, with_model: bool) -> dict:
    """Drive the page; what the browser saw."""
    target = next(t for t in tools.send("Target.getTargets")["targetInfos"] if t["type"] == "page")
    attached = tools.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
    tools.session = attached["sessionId"]
    tools.send(
        "Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1, mobile=False
    )
    tools.send("Page.navigate", url=url)
    title = tools.wait_for("document.readyState === 'complete' && document.title", "the page to load", 60)
    tools.wait_for("document.querySelector('.gradio-container') !== null", "gradio to render", 60)
    seen = {"url": url, "title": title}
    if not with_model:
        page = "document.body.innerText.includes('make demo') && document.body.innerText"
        seen["text"] = tools.wait_for(page, "the page that says how to make a model", 30)[:400]
        return seen
    tools.wait_for(click("[role=tab]", args.task), f"the {args.task} tab", 30)
    if args.task != "svg":
        upload(tools, args.input)
        tools.wait_for(f"!{UPLOAD_PROMPT}", "the upload to finish", 60)
    tools.wait_for(click("button", "Generate"), "the Generate button", 30)
    print(f"browser_check: generating one {args.task} sample ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    result = tools.wait_for(
        PLAYABLE_VIDEO.substitute(task=args.task), "the generated video and spectrogram", args.timeout
    )
    if "error" in result:
        raise CheckError(f"the page shows an error after Generate: {result['error']}")
    if not result["duration"] or not result["width"]:
        raise CheckError(f"the browser cannot play the generated video: {result}")
    if not tools.evaluate(SHOW_MIDDLE_FRAME.substitute(task=args.task)):
        raise CheckError("the browser did not decode a frame of the generated video")
    return {**seen, "task": args.task, "generate_s": round(time.monotonic() - start, 1), "video": result}


def write_chirp(path: Path, seconds: float = 2.5, rate: int = 44100) -> Path:
    """A rising tone (200 Hz -> 1.7 kHz) as a 16-bit mono wav: a sound that reads well in a spectrogram."""
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * (200 * t + 300 * t**2))
    with contextlib.closing(wave_file.open(str(path), "wb")) as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((wave * 32767).astype("<i2").tobytes())
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="a folder of tools/export_model.py")
    parser.add_argument("--url", help="check an app already running there (with a model) instead")
    parser.add_argument("--task", choices=["svg", "a2v", "v2a"], default="a2v")
    parser.add_argument(
        "--input", type=Path, help="the sound (a2v; default: a chirp) or video (v2a) to upload"
    )
    parser.add_argument("--steps", type=int, default=10, help="sampling steps for the one sample")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "app_screenshot.png")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the sample")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args()
    if not args.chromium:
        parser.error("no chromium on PATH: install it (Debian: apt-get install chromium) or pass --chromium")
    with_model = bool(args.url) or Path(args.model).is_dir()
    if with_model and args.task == "v2a" and not (args.input and args.input.is_file()):
        parser.error(f"--task v2a needs --input, an existing video file to upload (got {args.input})")
    if with_model and args.input is not None and not args.input.is_file():
        parser.error(f"--input {args.input}: no such file")
    if not with_model:
        print(
            f"browser_check: no model folder at {args.model}: checking the page without one", file=sys.stderr
        )
    try:
        with contextlib.ExitStack() as stack:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="browser-check-")))
            if args.task == "a2v" and args.input is None:
                args.input = write_chirp(scratch / "chirp.wav")
            url = args.url or stack.enter_context(served_app(args.model, args.steps))
            tools = stack.enter_context(contextlib.closing(DevTools(args.chromium, scratch / "profile")))
            print(f"browser_check: opening {url} in chromium ...", file=sys.stderr, flush=True)
            seen = check(args, tools, url, with_model)
            seen["screenshot"] = str(screenshot(tools, args.out))
    except CheckError as error:
        print(f"browser_check: error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"browser_check: page checked; screenshot {seen['screenshot']}", file=sys.stderr)
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
