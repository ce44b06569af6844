"""Pictures of clips for people: contact sheets of frames beside their spectrogram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# A perceptual dark-to-bright ramp (black, purple, orange, pale yellow) for spectrograms.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def spectrogram_rgb(logmel: torch.Tensor | np.ndarray, floor_db: float = -80.0) -> np.ndarray:
    """A natural-log mel [n_mels, T] as an RGB image [n_mels, T, 3], low frequencies at the bottom."""
    logmel = np.asarray(
        logmel.detach().cpu() if isinstance(logmel, torch.Tensor) else logmel, dtype=np.float32
    )
    decibels = 20.0 * logmel / np.log(10.0)
    level = np.clip((decibels - floor_db) / (decibels.max() - floor_db + 1e-6), 0.0, 1.0)[::-1]
    position = level * (len(_RAMP) - 1)
    lower = np.floor(position).astype(int).clip(0, len(_RAMP) - 2)
    weight = (position - lower)[..., None]
    return ((1 - weight) * _RAMP[lower] + weight * _RAMP[lower + 1]).astype(np.uint8)


def contact_sheet(
    rows: list[list[np.ndarray]], labels: list[str] | None = None, cell: int = 128
) -> Image.Image:
    """Lay out rows of uint8 RGB images [H, W, 3]; each image is resized to `cell` pixels high."""
    label_width = 110 if labels else 0
    rendered = [[_fit_height(image, cell) for image in row] for row in rows]
    width = label_width + max(sum(im.width for im in row) + 4 * (len(row) - 1) for row in rendered)
    sheet = Image.new("RGB", (width, len(rows) * (cell + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rendered):
        x, y = label_width, r * (cell + 4)
        if labels:
            draw.text((4, y + cell // 2 - 6), labels[r], fill="black")
        for image in row:
            sheet.paste(image, (x, y))
            x += image.width + 4
    return sheet


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _fit_height(image: np.ndarray, height: int) -> Image.Image:
    picture = Image.fromarray(image)
    width = max(1, round(picture.width * height / picture.height))
    return picture.resize((width, height), Image.Resampling.NEAREST)
